//! A small flag parser: `--name value` pairs, repeatable.

use anyhow::{Context, bail};

pub(crate) struct Flags(Vec<(String, String)>);

impl Flags {
    pub(crate) fn parse(args: &[String], known: &[&str]) -> anyhow::Result<Self> {
        let mut pairs = Vec::new();
        let mut iter = args.iter();
        while let Some(flag) = iter.next() {
            let Some(name) = flag.strip_prefix("--") else {
                bail!("unexpected argument `{flag}`");
            };
            if !known.contains(&name) {
                bail!(
                    "unknown flag `--{name}`; expected one of --{}",
                    known.join(", --")
                );
            }
            let value = iter
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            pairs.push((name.to_owned(), value.clone()));
        }
        Ok(Self(pairs))
    }

    pub(crate) fn one(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(flag, _)| flag == name)
            .map(|(_, value)| value.as_str())
    }

    pub(crate) fn all(&self, name: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(flag, _)| flag == name)
            .map(|(_, value)| value.as_str())
            .collect()
    }
}
