pub(crate) async fn commands(_args: &[String]) -> anyhow::Result<()> {
    anyhow::bail!("soon")
}
