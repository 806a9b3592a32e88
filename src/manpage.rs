//! `ftp-alg.toml(5)`, the configuration file's man page, generated from README.md's key table:
//! the README's "Configuration reference" is the one source, compiled in, so the page cannot
//! drift from it; a test checks that the table names exactly the keys the configuration
//! schema has. `ftp-alg manpages DIR` writes it beside the command's pages (clap_mangen).

use std::fmt::Write as _;

/// README.md, whose "Configuration reference" table the page is made from.
const README: &str = include_str!("../README.md");
/// The heading of that section.
const SECTION: &str = "## Configuration reference";

/// One row of the key table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRow {
    /// The key column as written (`pinholes.port_min`, `pinholes.port_max`).
    pub keys: String,
    /// Its default.
    pub default: String,
    /// What it does.
    pub meaning: String,
}

/// Why the table could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManpageError {
    /// README.md has no such section, or no table in it.
    #[error("README.md has no key table under {SECTION:?}")]
    NoTable,
    /// A row does not have three columns.
    #[error("README.md key table: a row without 3 columns: {0}")]
    BadRow(String),
}

/// The rows of README.md's key table.
pub fn key_rows() -> Result<Vec<KeyRow>, ManpageError> {
    rows(README)
}

fn rows(readme: &str) -> Result<Vec<KeyRow>, ManpageError> {
    let section = readme.split_once(SECTION).ok_or(ManpageError::NoTable)?.1;
    let section = section.split("\n## ").next().unwrap_or_default();
    let mut rows = Vec::new();
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let cells = split_cells(line);
        let [keys, default, meaning] = cells.as_slice() else {
            return Err(ManpageError::BadRow(line.to_owned()));
        };
        rows.push(KeyRow {
            keys: keys.clone(),
            default: default.clone(),
            meaning: meaning.clone(),
        });
    }
    if rows.is_empty() {
        return Err(ManpageError::NoTable);
    }
    Ok(rows)
}

/// The cells of a Markdown table row; `\|` is a literal bar.
fn split_cells(line: &str) -> Vec<String> {
    let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
    let mut cells = Vec::new();
    let mut cell = String::new();
    let mut chars = inner.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek() == Some(&'|') => {
                chars.next();
                cell.push('|');
            }
            '|' => cells.push(std::mem::take(&mut cell)),
            c => cell.push(c),
        }
    }
    cells.push(cell);
    cells.iter().map(|c| c.trim().to_owned()).collect()
}

/// Markdown inline text as roff: `code` in bold, roff's escape character escaped, and no line
/// starting with a control character.
fn roff(text: &str) -> String {
    let escaped = text.replace('\\', "\\e");
    let mut out = String::new();
    for (i, part) in escaped.split('`').enumerate() {
        match i % 2 {
            1 => {
                let _ = write!(out, "\\fB{part}\\fR");
            }
            _ => out.push_str(part),
        }
    }
    if out.starts_with(['.', '\'']) {
        out.insert_str(0, "\\&");
    }
    out
}

/// The page, in roff (man(7) macros).
pub fn config_page() -> Result<String, ManpageError> {
    let rows = key_rows()?;
    let version = env!("CARGO_PKG_VERSION");
    let mut page = format!(
        ".TH FTP-ALG.TOML 5 \"\" \"ftp-alg {version}\" \"File Formats\"\n\
         .SH NAME\nftp-alg.toml \\- configuration file of ftp-alg(1)\n\
         .SH SYNOPSIS\n/etc/ftp-alg/ftp-alg.toml\n\
         .SH DESCRIPTION\n\
         One TOML file; unknown keys are errors. \\fBftp-alg check-config FILE\\fR checks a file \
         and prints what it sets up. \\fBftp-alg run\\fR reads \\fB/etc/ftp-alg/ftp-alg.toml\\fR \
         unless \\fB--config\\fR names another file. SIGHUP (\\fBsystemctl reload ftp-alg\\fR) \
         re-reads the file: the keys marked (reload) apply to new sessions, every other changed \
         key needs a restart.\n\
         .SH KEYS\n"
    );
    for row in rows {
        let _ = write!(
            page,
            ".TP\n{}\nDefault: {}.\n{}\n",
            roff(&row.keys),
            roff(&row.default),
            roff(&row.meaning)
        );
    }
    page.push_str(".SH SEE ALSO\nftp\\-alg(1), nft(8)\n");
    Ok(page)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// Every dotted key of the configuration schema, from a configuration with every optional
    /// value set so that none is left out.
    fn schema_keys() -> std::collections::BTreeSet<String> {
        fn walk(
            prefix: &str,
            value: &serde_json::Value,
            out: &mut std::collections::BTreeSet<String>,
        ) {
            match value {
                serde_json::Value::Object(map) => {
                    for (k, v) in map {
                        let key = match prefix {
                            "" => k.clone(),
                            _ => format!("{prefix}.{k}"),
                        };
                        walk(&key, v, out);
                    }
                }
                _ => {
                    out.insert(prefix.to_owned());
                }
            }
        }
        let mut config = Config::builtin_gateway();
        config.proxy.upstream = Some("192.0.2.1:21".parse().unwrap());
        config.proxy.announce = Some("192.0.2.2".parse().unwrap());
        config.metrics.listen = Some("127.0.0.1:9477".parse().unwrap());
        config.tls = Some(crate::config::TlsConfig {
            certificate: "chain.pem".into(),
            key: "key.pem".into(),
            relay_buffer: crate::config::DEFAULT_TLS_RELAY_BUFFER,
            implicit_listen: vec!["0.0.0.0:990".parse().unwrap()],
            upstream: crate::config::UpstreamProtocol::Tls,
            upstream_ca: Some("ca.pem".into()),
            upstream_pin: None,
            upstream_name: Some("ftp.example.org".into()),
        });
        let mut out = std::collections::BTreeSet::new();
        walk("", &serde_json::to_value(&config).unwrap(), &mut out);
        out
    }

    #[test]
    fn the_readme_table_names_exactly_the_schemas_keys() {
        let mut documented = std::collections::BTreeSet::new();
        for row in key_rows().unwrap() {
            for key in row.keys.split(", ") {
                let key = key.trim_matches('`');
                if !key.ends_with(".*") {
                    documented.insert(key.to_owned());
                }
            }
        }
        assert_eq!(documented, schema_keys());
    }

    #[test]
    fn the_page_has_every_key() {
        let page = config_page().unwrap();
        assert!(page.starts_with(".TH FTP-ALG.TOML 5"));
        for row in key_rows().unwrap() {
            assert!(page.contains(&roff(&row.keys)), "{}", row.keys);
        }
        assert!(page.contains("\\fBpinholes.ct_mark_mask\\fR"));
        // The escaped bar of the ct_mark_mask row is one cell, not two.
        assert!(page.contains("ct mark & ~mask | ct_mark"), "{page}");
    }

    #[test]
    fn roff_escapes_what_it_must() {
        assert_eq!(roff("`a.b` c\\d"), "\\fBa.b\\fR c\\ed");
        assert_eq!(roff(".x"), "\\&.x");
    }
}
