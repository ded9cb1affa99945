//! The fenced code blocks of a Markdown document, with their info strings
//! (shared by the docs test and the newcomer walkthrough).

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
