//! The README's walkthrough is `docs/walkthrough.sh`: README.md shows exactly that script, and
//! the script, run with bash and curl against the whole system, answers what each of its
//! `# =>` lines says. So the README cannot drift from what the services do.

use std::time::Duration;

use serde_json::Value;

use crate::system::{System, TENANT, token};

const README: &str = include_str!("../../../README.md");
const SCRIPT: &str = include_str!("../../../docs/walkthrough.sh");

/// What README.md marks as part of the walkthrough: the code block after each such comment.
const MARK: &str =
    "<!-- docs/walkthrough.sh: a test runs it and checks this block is the script -->\n";

/// The script below its header (the lines up to `set -euo pipefail` and a blank line).
fn script_body() -> &'static str {
    let header_end = "set -euo pipefail\n\n";
    let at = SCRIPT
        .find(header_end)
        .expect("docs/walkthrough.sh starts with a header ending in `set -euo pipefail`");
    &SCRIPT[at + header_end.len()..]
}

/// The README's walkthrough blocks, in order.
fn readme_parts() -> Vec<&'static str> {
    README
        .split(MARK)
        .skip(1)
        .map(|after| {
            let block = after
                .strip_prefix("```sh\n")
                .expect("a marked walkthrough part is a ```sh block right below its mark");
            &block[..block.find("```\n").expect("the block ends")]
        })
        .collect()
}

#[test]
fn the_readme_shows_the_walkthrough_script_exactly() {
    let parts = readme_parts();
    assert_eq!(
        parts.len(),
        3,
        "the walkthrough's parts: using the command API, transfers, auditors"
    );
    assert_eq!(
        parts.join("\n"),
        script_body(),
        "README.md's walkthrough blocks, joined by a blank line, must be docs/walkthrough.sh \
         below its header"
    );
}

/// What a `# =>` line says a request answers.
#[derive(Debug)]
struct Claim {
    line: &'static str,
    status: u16,
    headers: Vec<(&'static str, &'static str)>,
    body: Option<Value>,
}

/// Every `# => STATUS [Header: value; ...] [{JSON members}]` line of the script, in order.
fn claims() -> Vec<Claim> {
    script_body()
        .lines()
        .filter_map(|line| line.strip_prefix("# => ").map(|rest| (line, rest)))
        .map(|(line, rest)| {
            let (status, rest) = rest.split_once(' ').unwrap_or((rest, ""));
            let (headers, body) = match rest.find('{') {
                Some(at) => (&rest[..at], Some(&rest[at..])),
                None => (rest, None),
            };
            Claim {
                line,
                status: status
                    .parse()
                    .unwrap_or_else(|_| panic!("status in {line}")),
                headers: headers
                    .split(';')
                    .map(str::trim)
                    .filter(|header| !header.is_empty())
                    .map(|header| {
                        header
                            .split_once(": ")
                            .unwrap_or_else(|| panic!("`Name: value` in {line}"))
                    })
                    .collect(),
                body: body.map(|body| {
                    serde_json::from_str(body).unwrap_or_else(|e| panic!("JSON in {line}: {e}"))
                }),
            }
        })
        .collect()
}

/// One answer as `curl -si` printed it.
#[derive(Debug)]
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

/// The answers in the script's output: each begins with its status line (a body printed by
/// `curl -si` ends without a newline, so the next status line may follow on the same line).
fn answers(output: &str) -> Vec<Answer> {
    output
        .split("HTTP/1.1 ")
        .skip(1)
        .map(|answer| {
            let (head, body) = answer
                .split_once("\r\n\r\n")
                .unwrap_or_else(|| panic!("headers end in {answer}"));
            let mut lines = head.split("\r\n");
            let status = lines.next().unwrap_or_default()[..3]
                .parse()
                .unwrap_or_else(|_| panic!("status in {answer}"));
            let headers = lines
                .filter_map(|line| line.split_once(": "))
                .map(|(name, value)| (name.to_ascii_lowercase(), value.to_owned()))
                .collect();
            Answer {
                status,
                headers,
                body: body.trim_end().to_owned(),
            }
        })
        .collect()
}

/// Each member the claim shows is in the answer with that value; a string with "..." in it
/// stands for any value (an id, a URL with an id).
fn assert_members(claim: &Claim, claimed: &Value, answer: &Value) {
    let Value::Object(claimed) = claimed else {
        panic!("{}: the claimed body is a JSON object", claim.line);
    };
    for (name, value) in claimed {
        let got = answer
            .get(name)
            .unwrap_or_else(|| panic!("{}: no `{name}` in {answer}", claim.line));
        if value.as_str().is_some_and(|text| text.contains("...")) {
            continue;
        }
        assert_eq!(got, value, "{}: `{name}` in {answer}", claim.line);
    }
}

#[tokio::test]
async fn the_walkthrough_answers_as_the_readme_says() {
    let system = System::start().await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/walkthrough.sh");
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        tokio::process::Command::new("bash")
            .arg(script)
            .env("COMMAND_API", &system.commands)
            .env("QUERY_API", &system.queries)
            .env("TOKEN", token(TENANT, &["teller"]))
            .env("VIEW", token(TENANT, &["viewer"]))
            .env("AUD", token(TENANT, &["auditor"]))
            .output(),
    )
    .await
    .expect("the walkthrough ends within 2 minutes")
    .expect("bash runs the walkthrough");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "the walkthrough failed ({}): {}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let answers = answers(&stdout);
    let claims = claims();
    assert_eq!(
        answers.len(),
        claims.len(),
        "one `# =>` line per answer printed:\n{stdout}"
    );
    for (claim, answer) in claims.iter().zip(&answers) {
        assert_eq!(answer.status, claim.status, "{}: {answer:?}", claim.line);
        for (name, value) in &claim.headers {
            let got = answer
                .headers
                .iter()
                .find(|(header, _)| *header == name.to_ascii_lowercase())
                .map(|(_, got)| got.as_str());
            assert_eq!(got, Some(*value), "{}: {name} in {answer:?}", claim.line);
        }
        match &claim.body {
            Some(claimed) => {
                let body: Value = serde_json::from_str(&answer.body)
                    .unwrap_or_else(|e| panic!("{}: JSON body ({e}): {answer:?}", claim.line));
                assert_members(claim, claimed, &body);
            }
            None if claim.status == 304 => assert_eq!(answer.body, "", "{}", claim.line),
            None => {}
        }
    }
}
