//! The fenced code blocks of a Markdown document, with their info strings
//! (shared by the docs test and the newcomer walkthrough), and how a `sh`
//! block is run.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug)]
pub struct Block {
    pub line: usize,
    pub lang: String,
    pub attrs: Vec<String>,
    pub text: String,
}

impl Block {
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find_map(|a| a.strip_prefix(name)?.strip_prefix('='))
    }
    pub fn flag(&self, name: &str) -> bool {
        self.attrs.iter().any(|a| a == name)
    }
}

/// Fenced (```) blocks, with their 1-based opening line.
pub fn code_blocks(markdown: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut open: Option<Block> = None;
    for (index, line) in markdown.lines().enumerate() {
        let trimmed = line.trim_start();
        match &mut open {
            None => {
                if let Some(info) = trimmed.strip_prefix("```") {
                    let mut words = info.split_whitespace().map(str::to_owned);
                    open = Some(Block {
                        line: index + 1,
                        lang: words.next().unwrap_or_default(),
                        attrs: words.collect(),
                        text: String::new(),
                    });
                }
            }
            Some(block) => {
                if trimmed.starts_with("```") {
                    blocks.extend(open.take());
                } else {
                    block.text.push_str(line);
                    block.text.push('\n');
                }
            }
        }
    }
    assert!(open.is_none(), "an unclosed code block");
    blocks
}

/// Runs a `sh` block as a person does at a terminal: `bash -euo pipefail`
/// in `cwd`, its environment set by `configure`; fails the test, naming
/// `at`, unless it succeeds. Returns the directory it ended in (a `cd`
/// carries over to the next block).
pub fn run_shell_block(
    at: &str,
    script: &str,
    cwd: &Path,
    configure: impl FnOnce(&mut Command),
) -> PathBuf {
    let cwd_file = tempfile::NamedTempFile::new().expect("temp file");
    let quoted = cwd_file.path().display().to_string().replace('\'', r"'\''");
    let mut command = Command::new("bash");
    command
        .args([
            "-euo",
            "pipefail",
            "-c",
            &format!("{script}\npwd > '{quoted}'\n"),
        ])
        .current_dir(cwd);
    configure(&mut command);
    let output = command.output().expect("run bash");
    assert!(
        output.status.success(),
        "{at} failed ({}):\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ended_in = std::fs::read_to_string(cwd_file.path()).expect("the block's final directory");
    PathBuf::from(ended_in.trim())
}
