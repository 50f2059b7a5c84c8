//! `cargo xtask config-reference`: the README's configuration table, rendered from the
//! settings each crate declares beside its config structs (`service_kit::config::Setting`:
//! name, typed default, meaning) and lists in its `SETTINGS`. The code reads the same
//! declarations, so a default is written once; the tests fail when the README is stale or
//! when a declared setting is missing from every `SETTINGS`.

use service_kit::config::Documented;

use crate::bench::write_section_in;

/// Every setting of every process, shared plumbing first.
fn all() -> impl Iterator<Item = &'static dyn Documented> {
    service_kit::config::SETTINGS
        .iter()
        .chain(service_kit::server::SETTINGS)
        .chain(command_api::config::SETTINGS)
        .chain(projector::SETTINGS)
        .chain(query_api::config::SETTINGS)
        .copied()
}

fn render() -> String {
    let mut table = String::from("| variable | default | meaning |\n|---|---|---|\n");
    for setting in all() {
        table.push_str(&format!(
            "| `{}` | {} | {} |\n",
            setting.name(),
            setting.default_markdown(),
            setting.meaning()
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

    /// How the services declare the variables they read: the only way to read one.
    const DECLARATIONS: &[&str] = &["Setting::new(", "Optional::new("];

    /// Files that read the environment other than through a declaration: the declarations'
    /// own reader, and variables of the tests and tools, which no service reads.
    const RAW_READERS: &[&str] = &[
        "service-kit/src/config.rs",
        "service-kit/src/testing.rs",
        "service-kit/src/db.rs",
        "query-api/src/contract.rs",
    ];

    /// Variable names declared anywhere under `dir`; fails on a raw `std::env` read outside
    /// [`RAW_READERS`].
    fn declared_in(dir: &Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                declared_in(&path, names);
                continue;
            }
            if path.extension().is_none_or(|ext| ext != "rs") {
                continue;
            }
            let source = std::fs::read_to_string(&path).unwrap();
            let relative = path.strip_prefix(workspace_root()).unwrap();
            if !RAW_READERS.iter().any(|raw| relative == Path::new(raw)) {
                assert!(
                    !source.contains("env::var"),
                    "{}: reads the environment without a `Setting`",
                    relative.display()
                );
            }
            for declaration in DECLARATIONS {
                for (at, _) in source.match_indices(declaration) {
                    let rest = source[at + declaration.len()..].trim_start();
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
    fn every_variable_the_services_declare_is_in_the_reference() {
        let mut declared = BTreeSet::new();
        for krate in ["service-kit", "command-api", "projector", "query-api"] {
            declared_in(&workspace_root().join(krate).join("src"), &mut declared);
        }
        // The scan's own unit tests declare `TEST_*` settings: no service reads those.
        declared.retain(|name| !name.starts_with("TEST_"));
        assert!(
            declared.contains("DATABASE_URL"),
            "the scan found nothing: {declared:?}"
        );
        let listed: BTreeSet<String> = all().map(|s| s.name().to_owned()).collect();
        let missing: Vec<&String> = declared.difference(&listed).collect();
        assert!(
            missing.is_empty(),
            "declared but not in any SETTINGS: {missing:?}"
        );
    }

    #[test]
    fn settings_are_listed_once() {
        let mut seen = BTreeSet::new();
        for setting in all() {
            assert!(
                seen.insert(setting.name()),
                "{} listed twice",
                setting.name()
            );
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
