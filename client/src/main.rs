//! `itamae`: command-line client for `itamaed`: chat with the served models, upload datasets,
//! run and watch fine-tuning jobs, manage adapters. `--json` prints the server's objects for
//! scripts; errors print the server's message and exit non-zero (see [`exit`]).
mod create;
mod progress;

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context};
use clap::{CommandFactory, Parser, Subcommand};
use itamae_client::{ChatRequest, Client, Error, Job, JobEvent, Message, FINE_TUNE};
use serde::Serialize;

use create::CreateArgs;
use progress::{Progress, Reporter};

/// Exit codes besides 0 (success) and clap's 2 (bad usage).
mod exit {
    /// The request failed: the server refused it, or could not be reached.
    pub const ERROR: u8 = 1;
    /// A watched job ended `failed`.
    pub const JOB_FAILED: u8 = 3;
    /// A watched job ended `cancelled`.
    pub const JOB_CANCELLED: u8 = 4;
}

#[derive(Parser, Debug)]
#[command(
    name = "itamae",
    version,
    about = "Talk to an itamaed daemon: chat, fine-tune, manage adapters"
)]
struct Cli {
    /// Base URL of the daemon.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ITAMAE_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// Sent as a bearer token.
    #[arg(
        long,
        global = true,
        help_heading = "Global options",
        env = "ITAMAE_API_KEY",
        hide_env_values = true
    )]
    api_key: Option<String>,
    /// Print the server's JSON objects instead of tables (for scripts).
    #[arg(long, global = true, help_heading = "Global options")]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// List the served models: the base and its tuned variants.
    Models,
    /// Chat with a model: one shot with -p, otherwise an interactive session.
    Chat(ChatArgs),
    /// Datasets for fine-tuning.
    #[command(subcommand)]
    Files(FilesCmd),
    /// Fine-tuning jobs.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// PEFT adapters: imported ones, and jobs' results and checkpoints.
    #[command(subcommand)]
    Adapters(AdaptersCmd),
    /// Print a shell completion script (e.g. `itamae completions bash > /etc/bash_completion.d/itamae`).
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(clap::Args, Debug)]
struct ChatArgs {
    /// Model id (default: the base model).
    #[arg(short, long)]
    model: Option<String>,
    /// Ask this once, print the streamed answer and exit.
    #[arg(short, long)]
    prompt: Option<String>,
    /// A system message opening the conversation.
    #[arg(long)]
    system: Option<String>,
    /// Longest answer, in tokens.
    #[arg(long, default_value_t = 512)]
    max_tokens: u32,
    #[arg(long)]
    temperature: Option<f32>,
}

#[derive(Subcommand, Debug)]
enum FilesCmd {
    /// Upload a JSONL dataset.
    Upload {
        path: PathBuf,
        #[arg(long, default_value = FINE_TUNE)]
        purpose: String,
    },
    /// List uploaded files, newest first.
    Ls,
    /// Show one file.
    Show { id: String },
    /// Delete a file.
    Rm { id: String },
    /// Download a file's content (to stdout without -o).
    Download {
        id: String,
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
enum JobsCmd {
    /// Create a fine-tuning job (uploading the data first when given a path).
    Create(Box<CreateArgs>),
    /// List jobs, newest first.
    Ls {
        #[arg(long)]
        limit: Option<u32>,
        /// Start after this job id.
        #[arg(long)]
        after: Option<String>,
        /// Every job, following the pages.
        #[arg(long, conflicts_with_all = ["limit", "after"])]
        all: bool,
    },
    /// Show one job.
    Show { id: String },
    /// Cancel a job.
    Cancel { id: String },
    /// Pause a running job (it stops between two steps).
    Pause { id: String },
    /// Resume a paused job.
    Resume { id: String },
    /// A job's events, oldest first.
    Events {
        id: String,
        /// How many of the newest events.
        #[arg(long)]
        limit: Option<u32>,
        /// Keep printing new events until the job ends.
        #[arg(short, long, conflicts_with = "limit")]
        follow: bool,
    },
    /// A job's checkpoints (each servable under its own model name).
    Checkpoints { id: String },
    /// Follow a job with a progress bar until it ends; prints the tuned model's name.
    /// Exits 0 if it succeeded, 3 if it failed, 4 if it was cancelled.
    Watch { id: String },
}

#[derive(Subcommand, Debug)]
enum AdaptersCmd {
    /// List adapters (imported, and served variants).
    Ls,
    /// Show one adapter.
    Show { id: String },
    /// Serve a stored adapter.
    Load { id: String },
    /// Stop serving an adapter (its files stay).
    Unload { id: String },
    /// Delete an imported adapter.
    Rm { id: String },
    /// Import a PEFT directory (adapter_config.json + adapter_model.safetensors) and serve it.
    Import {
        dir: PathBuf,
        /// Name to serve it under (default: the directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Replace only if the adapter is at this generation (0: only if the name is free).
        #[arg(long)]
        if_generation: Option<u64>,
    },
    /// Download an adapter's PEFT files into DIR.
    Export { id: String, dir: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) if broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(exit::ERROR)
        }
    }
}

/// The error's message, with the request field at fault when the server named one.
fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<Error>() {
        Some(Error::Api {
            message,
            param: Some(p),
            ..
        }) if !message.contains(p.as_str()) => format!("{message} (param: {p})"),
        _ => format!("{e:#}"),
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let client = Client::new(&cli.url, cli.api_key.clone())?;
    let out = Out { json: cli.json };
    match cli.command {
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "itamae", &mut std::io::stdout());
        }
        Command::Models => {
            let list = client.models()?;
            out.print(&list, || {
                table(
                    &["ID", "TYPE", "PARENT"],
                    list.data
                        .iter()
                        .map(|m| {
                            vec![
                                m.id.clone(),
                                m.extra
                                    .get("adapter_type")
                                    .and_then(|v| v.as_str())
                                    .unwrap_or(if m.parent.is_some() { "-" } else { "base" })
                                    .to_string(),
                                m.parent.clone().unwrap_or_else(|| "-".into()),
                            ]
                        })
                        .collect(),
                )
            })?;
        }
        Command::Chat(args) => chat(&client, args, cli.json)?,
        Command::Files(cmd) => files(&client, &out, cmd)?,
        Command::Jobs(cmd) => return jobs(&client, &out, cmd),
        Command::Adapters(cmd) => adapters(&client, &out, cmd)?,
    }
    Ok(ExitCode::SUCCESS)
}

/// Prints either the JSON of an object or its human form.
struct Out {
    json: bool,
}

impl Out {
    fn print<T: Serialize>(&self, v: &T, human: impl FnOnce() -> String) -> anyhow::Result<()> {
        let text = if self.json {
            serde_json::to_string_pretty(v)?
        } else {
            human()
        };
        Ok(line(text.trim_end_matches('\n'))?)
    }
}

/// One line to stdout; unlike `println!`, a closed pipe (`itamae ... | head`) is an error to
/// return, not a panic.
fn line(text: &str) -> std::io::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()
}

/// The reader of our output went away: stop quietly, as a program killed by SIGPIPE would.
fn broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        let io = c
            .downcast_ref::<std::io::Error>()
            .or(match c.downcast_ref::<Error>() {
                Some(Error::Io(io)) => Some(io),
                _ => None,
            });
        io.is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Left-aligned columns, two spaces apart.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let last = cells.len().saturating_sub(1);
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    std::iter::once(line(headers.iter().map(|h| h.to_string()).collect()))
        .chain(rows.into_iter().map(line))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `key: value` lines, aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| k.len()).max().unwrap_or(0) + 1;
    pairs
        .iter()
        .map(|(k, v)| format!("{:<w$} {v}", format!("{k}:")))
        .collect::<Vec<_>>()
        .join("\n")
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// `12s ago`, `3m05s ago`.
fn age(t: i64) -> String {
    format!(
        "{} ago",
        progress::duration(now().saturating_sub(t).max(0) as u64)
    )
}

fn opt(v: &Option<impl ToString>) -> String {
    v.as_ref().map_or_else(|| "-".into(), |x| x.to_string())
}

// ---- chat ----

fn chat(client: &Client, args: ChatArgs, json: bool) -> anyhow::Result<()> {
    let model = match args.model {
        Some(m) => m,
        None => client.base_model()?,
    };
    let mut history: Vec<Message> = args.system.into_iter().map(Message::system).collect();
    let session = Session {
        client,
        model: &model,
        max_tokens: args.max_tokens,
        temperature: args.temperature,
    };
    match args.prompt {
        Some(p) => {
            history.push(Message::user(p));
            if json {
                let c = client.chat(&session.request(&history))?;
                line(&serde_json::to_string_pretty(&c)?)?;
            } else {
                session.answer(&history)?;
            }
            Ok(())
        }
        None if json => bail!("--json needs a one-shot prompt (-p)"),
        None => repl(&session, history),
    }
}

struct Session<'a> {
    client: &'a Client,
    model: &'a str,
    max_tokens: u32,
    temperature: Option<f32>,
}

impl Session<'_> {
    fn request(&self, history: &[Message]) -> ChatRequest {
        ChatRequest {
            max_tokens: Some(self.max_tokens),
            temperature: self.temperature,
            ..ChatRequest::new(self.model, history.to_vec())
        }
    }

    /// Streams the answer to stdout and returns it.
    fn answer(&self, history: &[Message]) -> anyhow::Result<String> {
        let mut out = std::io::stdout().lock();
        let text = self.client.chat_stream(&self.request(history), |delta| {
            out.write_all(delta.as_bytes())?;
            out.flush()
        })?;
        writeln!(out)?;
        Ok(text)
    }
}

/// What the user typed in the chat session.
#[derive(Debug, PartialEq)]
enum Turn {
    Say(String),
    Reset,
    Exit,
    Nothing,
}

fn turn(line: &str) -> Turn {
    match line.trim() {
        "" => Turn::Nothing,
        "/exit" | "/quit" => Turn::Exit,
        "/reset" => Turn::Reset,
        s => Turn::Say(s.to_string()),
    }
}

/// The chat history file: `$ITAMAE_HISTORY`, else `$XDG_STATE_HOME/itamae/chat_history`, else
/// `~/.local/state/itamae/chat_history`.
fn history_file() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ITAMAE_HISTORY") {
        return Some(PathBuf::from(p));
    }
    let state = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".local/state")))?;
    Some(state.join("itamae").join("chat_history"))
}

/// A conversation: rustyline (line editing, history) on a terminal, plain lines from a pipe.
/// `/reset` forgets the conversation, `/exit` or end of input ends it.
fn repl(s: &Session, mut history: Vec<Message>) -> anyhow::Result<()> {
    let keep = history.len();
    if !std::io::stdin().is_terminal() {
        for line in std::io::stdin().lock().lines() {
            match turn(&line?) {
                Turn::Exit => break,
                Turn::Reset => history.truncate(keep),
                Turn::Nothing => {}
                Turn::Say(text) => {
                    history.push(Message::user(text));
                    let answer = s.answer(&history)?;
                    history.push(Message::assistant(answer));
                }
            }
        }
        return Ok(());
    }
    use rustyline::error::ReadlineError;
    let mut editor = rustyline::DefaultEditor::new().context("cannot start the line editor")?;
    let file = history_file();
    if let Some(f) = &file {
        // A first session has no history yet.
        let _ = editor.load_history(f);
    }
    eprintln!(
        "chatting with {} (/reset forgets the conversation, /exit or Ctrl-D quits)",
        s.model
    );
    loop {
        let line = match editor.readline("> ") {
            Ok(l) => l,
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => return Err(e.into()),
        };
        let t = turn(&line);
        if !matches!(t, Turn::Nothing) {
            let _ = editor.add_history_entry(line.trim());
        }
        match t {
            Turn::Exit => break,
            Turn::Reset => history.truncate(keep),
            Turn::Nothing => {}
            Turn::Say(text) => {
                history.push(Message::user(text));
                match s.answer(&history) {
                    Ok(answer) => history.push(Message::assistant(answer)),
                    Err(e) => {
                        // The session goes on; the failed turn is forgotten.
                        history.pop();
                        eprintln!("error: {}", describe(&e));
                    }
                }
            }
        }
    }
    if let Some(f) = &file {
        if let Some(dir) = f.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = editor.save_history(f) {
            eprintln!(
                "warning: cannot save the chat history to {}: {e}",
                f.display()
            );
        }
    }
    Ok(())
}

// ---- files ----

fn file_rows(files: &[itamae_client::FileObject]) -> String {
    table(
        &["ID", "BYTES", "CREATED", "PURPOSE", "FILENAME"],
        files
            .iter()
            .map(|f| {
                vec![
                    f.id.clone(),
                    f.bytes.to_string(),
                    age(f.created_at),
                    f.purpose.clone(),
                    f.filename.clone(),
                ]
            })
            .collect(),
    )
}

/// Uploads a local dataset, checking first that it can be read (a clearer message than the
/// transport's).
fn upload(
    client: &Client,
    path: &Path,
    purpose: &str,
) -> anyhow::Result<itamae_client::FileObject> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if !meta.is_file() {
        bail!("{} is not a file", path.display());
    }
    Ok(client.upload_file(path, purpose)?)
}

fn files(client: &Client, out: &Out, cmd: FilesCmd) -> anyhow::Result<()> {
    match cmd {
        FilesCmd::Upload { path, purpose } => {
            let f = upload(client, &path, &purpose)?;
            out.print(&f, || f.id.clone())
        }
        FilesCmd::Ls => {
            let list = client.files()?;
            out.print(&list, || file_rows(&list.data))
        }
        FilesCmd::Show { id } => {
            let f = client.file(&id)?;
            out.print(&f, || file_rows(std::slice::from_ref(&f)))
        }
        FilesCmd::Rm { id } => {
            let d = client.delete_file(&id)?;
            out.print(&d, || format!("deleted {}", d.id))
        }
        FilesCmd::Download { id, output } => match output {
            None => {
                client.file_content(&id, &mut std::io::stdout().lock())?;
                Ok(())
            }
            Some(path) => {
                let tmp = path.with_file_name(format!(
                    ".{}.part-{}",
                    path.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    std::process::id()
                ));
                let written = (|| -> anyhow::Result<u64> {
                    let mut f = std::fs::File::create(&tmp)
                        .with_context(|| format!("cannot write {}", tmp.display()))?;
                    let n = client.file_content(&id, &mut f)?;
                    f.sync_all()?;
                    std::fs::rename(&tmp, &path)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    Ok(n)
                })();
                if written.is_err() {
                    let _ = std::fs::remove_file(&tmp);
                }
                let n = written?;
                eprintln!("wrote {n} bytes to {}", path.display());
                Ok(())
            }
        },
    }
}

// ---- jobs ----

fn job_rows(jobs: &[Job]) -> String {
    table(
        &["ID", "STATUS", "METHOD", "CREATED", "FINE-TUNED MODEL"],
        jobs.iter()
            .map(|j| {
                vec![
                    j.id.clone(),
                    j.status.clone(),
                    j.adapter_type().to_string(),
                    age(j.created_at),
                    opt(&j.fine_tuned_model),
                ]
            })
            .collect(),
    )
}

fn job_fields(j: &Job) -> String {
    let mut pairs = vec![
        ("id", j.id.clone()),
        ("status", j.status.clone()),
        ("model", j.model.clone()),
        ("method", j.adapter_type().to_string()),
        ("training_file", j.training_file.clone()),
        ("validation_file", opt(&j.validation_file)),
        ("fine_tuned_model", opt(&j.fine_tuned_model)),
        ("trained_tokens", opt(&j.trained_tokens)),
        ("created", age(j.created_at)),
        ("finished", j.finished_at.map_or("-".into(), age)),
        ("hyperparameters", j.hyperparameters.to_string()),
        ("adapter", j.method["supervised"]["adapter"].to_string()),
    ];
    if let Some(e) = &j.error {
        pairs.push(("error", e.message.clone()));
    }
    fields(&pairs)
}

fn event_line(e: &JobEvent) -> String {
    format!("{:>9}  {:<5}  {}", age(e.created_at), e.level, e.message)
}

fn jobs(client: &Client, out: &Out, cmd: JobsCmd) -> anyhow::Result<ExitCode> {
    let show = |j: Job| out.print(&j, || job_fields(&j));
    match cmd {
        JobsCmd::Create(args) => return create_job(client, out, &args),
        JobsCmd::Ls { limit, after, all } => {
            let mut list = client.jobs(after.as_deref(), limit)?;
            while all && list.has_more {
                let Some(last) = list.data.last().map(|j| j.id.clone()) else {
                    break;
                };
                let next = client.jobs(Some(&last), Some(100))?;
                list.data.extend(next.data);
                list.has_more = next.has_more;
            }
            out.print(&list, || job_rows(&list.data))?;
        }
        JobsCmd::Show { id } => show(client.job(&id)?)?,
        JobsCmd::Cancel { id } => show(client.cancel_job(&id)?)?,
        JobsCmd::Pause { id } => show(client.pause_job(&id)?)?,
        JobsCmd::Resume { id } => show(client.resume_job(&id)?)?,
        JobsCmd::Events { id, limit, follow } => {
            if follow {
                client.stream_job_events(&id, |e| {
                    let line = if out.json {
                        serde_json::to_string(&e).map_err(|e| Error::Protocol(e.to_string()))?
                    } else {
                        event_line(&e)
                    };
                    self::line(&line).map_err(Error::Io)
                })?;
            } else {
                let mut list = client.job_events(&id, None, limit)?;
                list.data.reverse();
                out.print(&list, || {
                    list.data
                        .iter()
                        .map(event_line)
                        .collect::<Vec<_>>()
                        .join("\n")
                })?;
            }
        }
        JobsCmd::Checkpoints { id } => {
            let list = client.job_checkpoints(&id, None, Some(100))?;
            let metric = |c: &itamae_client::Checkpoint, k: &str| {
                c.metrics[k]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{v:.4}"))
            };
            out.print(&list, || {
                table(
                    &["STEP", "TRAIN LOSS", "VALID LOSS", "MODEL"],
                    list.data
                        .iter()
                        .map(|c| {
                            vec![
                                c.step_number.to_string(),
                                metric(c, "train_loss"),
                                metric(c, "valid_loss"),
                                c.fine_tuned_model_checkpoint.clone(),
                            ]
                        })
                        .collect(),
                )
            })?;
        }
        JobsCmd::Watch { id } => return watch(client, out, &id),
    }
    Ok(ExitCode::SUCCESS)
}

fn create_job(client: &Client, out: &Out, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let model = match &args.model {
        Some(m) => m.clone(),
        None => client.base_model()?,
    };
    // Flags are checked before anything is uploaded.
    args.request(model.clone(), String::new(), None)
        .map_err(|e| anyhow!(e))?;
    let upload_id = |path: &Path, what: &str| -> anyhow::Result<String> {
        let f = upload(client, path, FINE_TUNE)?;
        eprintln!("uploaded {what} {} as {}", path.display(), f.id);
        Ok(f.id)
    };
    let training = match (&args.file, &args.file_id) {
        (Some(path), _) => upload_id(path, "training file")?,
        (None, Some(id)) => id.clone(),
        (None, None) => bail!("give --file PATH or --file-id ID"),
    };
    let validation = match (&args.validation_file, &args.validation_file_id) {
        (Some(path), _) => Some(upload_id(path, "validation file")?),
        (None, id) => id.clone(),
    };
    let req = args
        .request(model, training, validation)
        .map_err(|e| anyhow!(e))?;
    let job = client.create_job(&req)?;
    if args.watch {
        eprintln!("created {}", job.id);
        return watch(client, out, &job.id);
    }
    out.print(&job, || job.id.clone())?;
    Ok(ExitCode::SUCCESS)
}

/// Times the event stream is re-opened after the connection drops.
const STREAM_RETRIES: usize = 5;

/// Follows a job's live event stream to its end, then reports its final status.
fn watch(client: &Client, out: &Out, id: &str) -> anyhow::Result<ExitCode> {
    let mut job = client.job(id)?;
    let mut reporter = Reporter::new(&job.id);
    reporter.status(&job.status);
    let mut progress = Progress::default();
    // The stream replays every event from the start: after a reconnect, skip the seen ones.
    let mut seen = std::collections::HashSet::new();
    let mut failures = 0;
    while !job.is_finished() {
        let streamed = client.stream_job_events(id, |e| {
            if seen.insert(e.id.clone()) {
                let update = progress.apply(&e);
                reporter.show(&progress, &update);
            }
            Ok(())
        });
        match streamed {
            Ok(()) => {}
            // The job itself is gone or the request is refused: nothing to wait for.
            Err(e @ Error::Api { .. }) => {
                reporter.finish();
                return Err(e.into());
            }
            Err(e) => {
                failures += 1;
                if failures > STREAM_RETRIES {
                    reporter.finish();
                    return Err(anyhow!(e).context("lost the job's event stream"));
                }
            }
        }
        job = client.job(id)?;
        reporter.status(&job.status);
        if !job.is_finished() {
            // The server ends the stream only once the job has ended: the connection was cut.
            std::thread::sleep(Duration::from_secs(1));
        }
    }
    reporter.finish();
    if out.json {
        line(&serde_json::to_string_pretty(&job)?)?;
    }
    let took = job
        .finished_at
        .map(|f| {
            format!(
                " in {}",
                progress::duration((f - job.created_at).max(0) as u64)
            )
        })
        .unwrap_or_default();
    match job.status.as_str() {
        "succeeded" => {
            let model = job.fine_tuned_model.clone().unwrap_or_default();
            eprintln!("job {} succeeded{took}: {model}", job.id);
            if !out.json {
                line(&model)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        "cancelled" => {
            eprintln!("job {} was cancelled", job.id);
            Ok(ExitCode::from(exit::JOB_CANCELLED))
        }
        status => {
            let why = job.error.as_ref().map_or("", |e| e.message.as_str());
            eprintln!("job {} {status}{took}: {why}", job.id);
            Ok(ExitCode::from(exit::JOB_FAILED))
        }
    }
}

// ---- adapters ----

fn adapter_rows(list: &[itamae_client::Adapter]) -> String {
    table(
        &["ID", "TYPE", "RESIDENT", "SOURCE", "SIZE"],
        list.iter()
            .map(|a| {
                vec![
                    a.id.clone(),
                    opt(&a.kind),
                    if a.resident { "yes" } else { "no" }.to_string(),
                    opt(&a.source),
                    a.size_bytes.map_or("-".into(), human_bytes),
                ]
            })
            .collect(),
    )
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n < 1 << 10 => format!("{n} B"),
        n if n < 1 << 20 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{:.1} MiB", n as f64 / (1 << 20) as f64),
    }
}

fn adapters(client: &Client, out: &Out, cmd: AdaptersCmd) -> anyhow::Result<()> {
    let one = |a: itamae_client::Adapter| out.print(&a, || adapter_rows(std::slice::from_ref(&a)));
    match cmd {
        AdaptersCmd::Ls => {
            let list = client.adapters()?;
            out.print(&list, || adapter_rows(&list.data))
        }
        AdaptersCmd::Show { id } => one(client.adapter(&id)?),
        AdaptersCmd::Load { id } => one(client.load_adapter(&id)?),
        AdaptersCmd::Unload { id } => one(client.unload_adapter(&id)?),
        AdaptersCmd::Rm { id } => {
            let d = client.delete_adapter(&id)?;
            out.print(&d, || format!("deleted {}", d.id))
        }
        AdaptersCmd::Import {
            dir,
            name,
            if_generation,
        } => {
            for f in [
                itamae_client::ADAPTER_CONFIG,
                itamae_client::ADAPTER_WEIGHTS,
            ] {
                let p = dir.join(f);
                if !p.is_file() {
                    bail!(
                        "{} is not a PEFT adapter directory: {f} is missing",
                        dir.display()
                    );
                }
            }
            let name = match name {
                Some(n) => n,
                None => std::fs::canonicalize(&dir)
                    .ok()
                    .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                    .ok_or_else(|| anyhow!("give the adapter a --name"))?,
            };
            one(client.import_adapter(&name, &dir, if_generation)?)
        }
        AdaptersCmd::Export { id, dir } => {
            let written = client.export_adapter(&id, &dir)?;
            if out.json {
                let paths: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                out.print(&serde_json::json!({"id": id, "files": paths}), String::new)
            } else {
                for p in written {
                    line(&p.display().to_string())?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_flags_and_defaults() {
        let cli = Cli::try_parse_from(["itamae", "chat", "-p", "hi", "--json"]).unwrap();
        assert!(cli.json);
        match cli.command {
            Command::Chat(c) => {
                assert_eq!(c.max_tokens, 512, "a bounded default answer length");
                assert_eq!(c.prompt.as_deref(), Some("hi"));
            }
            other => panic!("{other:?}"),
        }
        let cli =
            Cli::try_parse_from(["itamae", "--url", "http://h:1", "jobs", "watch", "ftjob-1"])
                .unwrap();
        assert_eq!(cli.url, "http://h:1");
        assert!(matches!(cli.command, Command::Jobs(JobsCmd::Watch { id }) if id == "ftjob-1"));
        assert!(Cli::try_parse_from(["itamae", "jobs", "ls", "--all", "--limit", "3"]).is_err());
        assert!(Cli::try_parse_from(["itamae", "completions", "tcsh"]).is_err());
    }

    #[test]
    fn chat_requests_carry_max_tokens() {
        let client = Client::new("http://h:1", None).unwrap();
        let s = Session {
            client: &client,
            model: "m",
            max_tokens: 512,
            temperature: None,
        };
        let body = serde_json::to_value(s.request(&[Message::user("hi")])).unwrap();
        assert_eq!(body["max_tokens"], 512);
        assert!(body.get("temperature").is_none());
    }

    #[test]
    fn repl_turns() {
        assert_eq!(turn("  hello "), Turn::Say("hello".into()));
        assert_eq!(turn(""), Turn::Nothing);
        assert_eq!(turn("/reset"), Turn::Reset);
        assert_eq!(turn("/quit"), Turn::Exit);
    }

    #[test]
    fn tables_align() {
        let t = table(
            &["ID", "STATUS"],
            vec![
                vec!["ftjob-1".into(), "running".into()],
                vec!["x".into(), "failed".into()],
            ],
        );
        assert_eq!(t, "ID       STATUS\nftjob-1  running\nx        failed");
        assert_eq!(
            fields(&[("id", "a".into()), ("status", "b".into())]),
            "id:     a\nstatus: b"
        );
    }

    #[test]
    fn server_errors_name_the_param() {
        let e = anyhow::Error::from(itamae_client::api_error(
            400,
            r#"{"error":{"message":"suffix must be 1 to 64 characters long","param":"suffix"}}"#,
        ));
        assert_eq!(describe(&e), "suffix must be 1 to 64 characters long");
        let e = anyhow::Error::from(itamae_client::api_error(
            400,
            r#"{"error":{"message":"must be positive","param":"method.supervised.adapter.r"}}"#,
        ));
        assert_eq!(
            describe(&e),
            "must be positive (param: method.supervised.adapter.r)"
        );
    }
}
