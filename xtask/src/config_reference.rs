//! `cargo xtask config-reference`: the README's configuration table, rendered from the
//! `SETTINGS` each crate keeps beside its config structs. The tests fail when the README is
//! stale or when the code reads a variable no `SETTINGS` lists, so the two cannot drift.

use service_kit::config::Setting;

use crate::bench::write_section_in;

/// Every setting of every process, shared plumbing first.
fn all() -> impl Iterator<Item = &'static Setting> {
    service_kit::config::SETTINGS
        .iter()
        .chain(service_kit::server::SETTINGS)
        .chain(command_api::config::SETTINGS)
        .chain(projector::SETTINGS)
        .chain(query_api::config::SETTINGS)
}

fn render() -> String {
    let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for setting in all() {
        table.push_str(&format!(
            "| `{}` | {} | {} |\n",
            setting.name, setting.default, setting.meaning
        ));
    }
    table
}

pub(crate) fn write() -> anyhow::Result<()> {
    write_section_in("README.md", "config", &render())?;
    println!(
        "README.md: configuration table written ({} variables)",
        all().count()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;
    use crate::dev::workspace_root;

    /// The calls through which the services read their environment.
    const READERS: &[&str] = &["optional(", "required(", "parsed_or("];

    /// Variable names passed to [`READERS`] anywhere under `dir`.
    fn read_in(dir: &Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                read_in(&path, names);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            for reader in READERS {
                for (at, _) in source.match_indices(reader) {
                    let rest = source[at + reader.len()..].trim_start();
                    let Some(quoted) = rest.strip_prefix('"') else {
                        continue;
                    };
                    let name: String = quoted
                        .chars()
                        .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                        .collect();
                    if !name.is_empty() {
                        names.insert(name);
                    }
                }
            }
        }
    }

    #[test]
    fn every_variable_the_services_read_is_in_the_reference() {
        let mut read = BTreeSet::new();
        for krate in ["service-kit", "command-api", "projector", "query-api"] {
            read_in(&workspace_root().join(krate).join("src"), &mut read);
        }
        assert!(
            read.contains("DATABASE_URL"),
            "the scan found nothing: {read:?}"
        );
        let listed: BTreeSet<String> = all().map(|s| s.name.to_owned()).collect();
        let missing: Vec<&String> = read.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "read but not in any SETTINGS: {missing:?}"
        );
    }

    #[test]
    fn settings_are_listed_once() {
        let mut seen = BTreeSet::new();
        for setting in all() {
            assert!(seen.insert(setting.name), "{} listed twice", setting.name);
        }
    }

    #[test]
    fn the_readme_table_is_current() {
        let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
        assert!(
            readme.contains(&format!(
                "<!-- generated:config -->\n{}<!-- /generated:config -->",
                render()
            )),
            "README.md's configuration table is stale: run `cargo xtask config-reference`"
        );
    }
}
