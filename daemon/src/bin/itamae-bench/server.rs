//! The in-process daemon the HTTP benchmarks (`swap`, `job-swap`) run against, and the
//! measured streamed chat their clients send through `itamae-client`.
use std::time::Instant;

use itamae_client::load::StreamChatRequest;
use itamae_client::{ChatRequest, Client, Message};

/// Serves the API of an in-process daemon on a free loopback port (on its own thread with an
/// actix System) and waits until `/readyz` answers; returns a client for it.
pub(crate) fn start_server(
    engine: itamae::engine::EngineHandle,
    jobs: Option<itamae::jobs::Jobs>,
    store: itamae::jobs::AdapterStore,
) -> anyhow::Result<Client> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    std::thread::Builder::new()
        .name("bench-http".into())
        .spawn(move || {
            let served = actix_web::rt::System::new().block_on(itamae::api::serve(
                engine,
                "127.0.0.1".into(),
                port,
                jobs,
                Some(store),
                itamae::api::auth::Auth::disabled(),
                itamae::api::Shutdown {
                    grace: std::time::Duration::from_secs(1),
                    on_signal: Box::new(|| {}),
                },
            ));
            if let Err(e) = served {
                eprintln!("bench server: {e}");
            }
        })?;
    let client = Client::new(&format!("http://127.0.0.1:{port}"), None)?;
    let started = Instant::now();
    while client.ready().is_err() {
        anyhow::ensure!(
            started.elapsed().as_secs() < 30,
            "the bench server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(client)
}

/// What one streamed chat request saw.
pub(crate) struct StreamResult {
    pub ok: bool,
    pub tokens: usize,
    /// From sending the request to the first content chunk.
    pub ttft: Option<f64>,
}

/// One streamed chat on `model` (`max_tokens`, temperature 0.8, `seed`), timed from sending.
/// Not ok when the request fails, the stream carries an error or ends before it is done.
pub(crate) fn stream_chat(
    client: &Client,
    model: &str,
    max_tokens: usize,
    seed: u64,
) -> StreamResult {
    let req = StreamChatRequest::new(
        ChatRequest::new(model, vec![Message::user("Tell me about sushi.")])
            .max_tokens(max_tokens as u32)
            .temperature(0.8),
    )
    .seed(seed);
    let mut ttft = None;
    let mut tokens = 0;
    let started = Instant::now();
    let done = client.chat_stream_chunks(&req, |chunk| {
        if !chunk.content.is_empty() && ttft.is_none() {
            ttft = Some(started.elapsed().as_secs_f64());
        }
        if let Some(n) = chunk.completion_tokens {
            tokens = n as usize;
        }
    });
    StreamResult {
        ok: done.is_ok(),
        tokens: if done.is_ok() { tokens } else { 0 },
        ttft: if done.is_ok() { ttft } else { None },
    }
}

/// The value at `p` (0 to 1) of sorted figures; NaN when there are none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}
