//! Config files for the binaries: every command-line flag is also a key of the `--config` TOML
//! file (`max_message_bytes = 1048576` for `--max-message-bytes`), and flags win.
//!
//! The file's keys become arguments placed before the command line's, and the command is parsed
//! with later occurrences overriding earlier ones, so one mechanism serves every flag.

use anyhow::{bail, Context, Result};
use std::ffi::OsString;

/// Returns `args` with the `--config` file's settings in front of them.
pub fn with_config_file(cmd: &clap::Command, args: Vec<OsString>) -> Result<Vec<OsString>> {
    let mut path = None;
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--config" {
            path = it.next().map(|p| p.to_string_lossy().into_owned());
        } else if let Some(p) = a.strip_prefix("--config=") {
            path = Some(p.to_string());
        } else if a == "--" || !a.starts_with('-') && is_subcommand(cmd, &a) {
            break;
        }
    }
    let Some(path) = path.or_else(|| std::env::var("PRESCIENT_CONFIG").ok()) else {
        return Ok(args);
    };
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading config file {path}"))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(1, |s| {
            text[..s.start.min(text.len())].matches('\n').count() + 1
        });
        anyhow::anyhow!("{path}:{line}: {}", e.message().trim_end())
    })?;
    let line_of = |key: &str| {
        text.lines()
            .position(|l| l.trim_start().starts_with(key))
            .map_or(0, |n| n + 1)
    };
    let mut injected: Vec<OsString> = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = cmd
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && long != "config")
        else {
            let known: Vec<String> = cmd
                .get_arguments()
                .filter_map(|a| a.get_long())
                .filter(|l| *l != "config" && *l != "help" && *l != "version")
                .map(|l| l.replace('-', "_"))
                .collect();
            bail!(
                "{path}:{}: unknown key {key:?} (known keys: {})",
                line_of(key),
                known.join(", ")
            );
        };
        let flag = matches!(arg.get_action(), clap::ArgAction::SetTrue);
        let values: Vec<&toml::Value> = match value {
            toml::Value::Array(items) => items.iter().collect(),
            v => vec![v],
        };
        for v in values {
            let text = match v {
                toml::Value::String(s) => s.clone(),
                toml::Value::Integer(i) => i.to_string(),
                toml::Value::Float(f) => f.to_string(),
                toml::Value::Boolean(b) if flag => {
                    if *b {
                        injected.push(format!("--{long}").into());
                    }
                    continue;
                }
                toml::Value::Boolean(b) => b.to_string(),
                other => bail!(
                    "{path}:{}: key {key:?} must be a string, number or boolean, not {}",
                    line_of(key),
                    other.type_str()
                ),
            };
            injected.push(format!("--{long}").into());
            injected.push(text.into());
        }
    }
    let mut out = vec![args[0].clone()];
    out.extend(injected);
    out.extend(args.into_iter().skip(1));
    Ok(out)
}

fn is_subcommand(cmd: &clap::Command, name: &str) -> bool {
    cmd.get_subcommands().any(|s| s.get_name() == name)
}
