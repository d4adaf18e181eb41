//! How an error reaches the terminal.

/// An error and its causes, each said once. Library errors often put their cause's text
/// into their own message and also return it as their source; printing the whole chain
/// would say it twice.
pub fn causes_once(error: &anyhow::Error) -> String {
    let mut said: Vec<String> = Vec::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !said.iter().any(|earlier| earlier.contains(text.trim())) {
            said.push(text);
        }
    }
    said.join("\n  caused by: ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cause_is_said_once() {
        let io = std::io::Error::other("disk on fire");
        let error = anyhow::Error::new(io)
            .context("cannot read x: disk on fire")
            .context("loading x");
        assert_eq!(
            causes_once(&error),
            "loading x\n  caused by: cannot read x: disk on fire"
        );
    }
}
