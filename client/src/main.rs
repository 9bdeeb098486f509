//! `itamae`: command-line client for `itamaed`.
use std::io::{BufRead, IsTerminal, Write};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use itamae_client::{Client, Message};

#[derive(Parser, Debug)]
#[command(name = "itamae", version, about = "Talk to an itamaed daemon")]
struct Cli {
    /// Base URL of the daemon.
    #[arg(
        long,
        global = true,
        env = "ITAMAE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Sent as a bearer token.
    #[arg(long, global = true, env = "ITAMAE_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Chat with a model: one shot with -p, otherwise an interactive session reading stdin.
    Chat {
        /// Model id (default: the first model the daemon lists).
        #[arg(short, long)]
        model: Option<String>,
        /// Ask this once, print the streamed answer and exit.
        #[arg(short, long)]
        prompt: Option<String>,
        /// A system message opening the conversation.
        #[arg(long)]
        system: Option<String>,
        #[arg(long)]
        max_tokens: Option<u32>,
        #[arg(long)]
        temperature: Option<f32>,
    },
    /// List the served model ids.
    Models,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let client = Client::new(&cli.url, cli.api_key)?;
    match cli.command {
        Command::Models => {
            for m in client.models()? {
                println!("{}", m.id);
            }
            Ok(())
        }
        Command::Chat {
            model,
            prompt,
            system,
            max_tokens,
            temperature,
        } => {
            let model = match model {
                Some(m) => m,
                None => client
                    .models()?
                    .into_iter()
                    .next()
                    .map(|m| m.id)
                    .ok_or_else(|| anyhow::anyhow!("the daemon serves no model"))?,
            };
            let mut history: Vec<Message> = system.into_iter().map(Message::system).collect();
            let opts = Opts {
                client: &client,
                model: &model,
                max_tokens,
                temperature,
            };
            match prompt {
                Some(p) => {
                    history.push(Message::user(p));
                    opts.answer(&history)?;
                    Ok(())
                }
                None => repl(&opts, history),
            }
        }
    }
}

struct Opts<'a> {
    client: &'a Client,
    model: &'a str,
    max_tokens: Option<u32>,
    temperature: Option<f32>,
}

impl Opts<'_> {
    /// Streams the answer to stdout and returns it.
    fn answer(&self, history: &[Message]) -> anyhow::Result<String> {
        let mut out = std::io::stdout().lock();
        let mut write_failed = None;
        let text = self.client.chat_stream(
            self.model,
            history,
            self.max_tokens,
            self.temperature,
            |delta| {
                if write_failed.is_none() {
                    if let Err(e) = out.write_all(delta.as_bytes()).and_then(|_| out.flush()) {
                        write_failed = Some(e);
                    }
                }
            },
        )?;
        if let Some(e) = write_failed {
            return Err(e.into());
        }
        writeln!(out)?;
        Ok(text)
    }
}

/// Reads user turns from stdin, keeping the conversation; `/reset` forgets it, `/exit` or EOF ends.
fn repl(opts: &Opts, mut history: Vec<Message>) -> anyhow::Result<()> {
    let interactive = std::io::stdin().is_terminal();
    let keep = history.len();
    if interactive {
        eprintln!(
            "chatting with {} (/reset forgets the conversation, /exit or Ctrl-D quits)",
            opts.model
        );
    }
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        if interactive {
            eprint!("> ");
            std::io::stderr().flush().ok();
        }
        let Some(line) = lines.next() else { break };
        let line = line?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                history.truncate(keep);
                continue;
            }
            _ => {}
        }
        history.push(Message::user(line));
        match opts.answer(&history) {
            Ok(text) => history.push(Message::assistant(text)),
            Err(e) => {
                // Keep the session going in a terminal; fail a scripted run.
                history.pop();
                if interactive {
                    eprintln!("error: {e}");
                } else {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}
