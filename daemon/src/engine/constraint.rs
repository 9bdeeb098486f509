//! Constrained decoding (structured outputs): a request's `response_format`, `guided_choice`,
//! `guided_regex`, `guided_grammar` or forced tool call becomes an `llguidance` grammar over the
//! model's own vocabulary, and every sampled token is drawn from the tokens that grammar allows.
//!
//! Why it is shaped this way:
//! - The vocabulary trie and the token-set slicer (llguidance's `ParserFactory`) take a second or
//!   more to build for a 50k–150k vocabulary, so [`GrammarCache`] builds them once per base
//!   model, on the first constrained request, and keeps compiled grammars too (a batch of clients
//!   sending one schema compiles it once).
//! - Grammars compile in [`GrammarCache::compile`], on the HTTP worker (from
//!   `EngineHandle::prepare`), so an invalid schema, regex or grammar is a 400 naming the request
//!   field before anything is queued.
//! - Each mask is computed on the `itamae-masks` thread while the engine thread runs the forward:
//!   [`Guide::commit`] hands the matcher over right after a token is chosen and
//!   [`Guide::apply`] collects the mask when the next logits are ready. The first mask is
//!   started as soon as the grammar compiles, so it overlaps queueing and prefill.
use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{SimpleVob, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};

use super::EngineError;
use crate::model::TextSpec;

/// What the output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintKind {
    /// Any JSON object (`response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid against a schema (`response_format.json_schema.schema`).
    JsonSchema(Value),
    /// One of these strings exactly (`guided_choice`).
    Choice(Vec<String>),
    /// A full match of a regular expression, Rust `regex` syntax (`guided_regex`).
    Regex(String),
    /// A Lark grammar in llguidance's dialect (`guided_grammar`), also how forced tool calls
    /// are expressed.
    Lark(String),
}

/// A constraint and the request field it came from, which errors name.
#[derive(Debug, Clone, PartialEq)]
pub struct Constraint {
    pub kind: ConstraintKind,
    /// `response_format.json_schema.schema`, `guided_regex`, `tool_choice`, ...
    pub param: String,
}

impl Constraint {
    fn grammar(&self) -> TopLevelGrammar {
        match &self.kind {
            ConstraintKind::JsonObject => TopLevelGrammar::from_json_schema(compact(json!({
                "type": "object"
            }))),
            ConstraintKind::JsonSchema(schema) => {
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            ConstraintKind::Choice(choices) => {
                let alternatives: Vec<String> =
                    choices.iter().map(|c| regex_syntax::escape(c)).collect();
                TopLevelGrammar::from_regex(&format!("(?:{})", alternatives.join("|")))
            }
            ConstraintKind::Regex(rx) => TopLevelGrammar::from_regex(rx),
            ConstraintKind::Lark(g) => TopLevelGrammar::from_lark(g.clone()),
        }
    }

    /// The cache key: the constraint's full content.
    fn key(&self) -> String {
        format!("{:?}", self.kind)
    }
}

/// JSON as OpenAI's structured outputs print it: `", "` and `": "` separators and no other
/// whitespace. llguidance's default allows any run of whitespace between tokens, which lets a
/// small model emit newlines until `max_tokens` instead of closing the object.
fn compact(mut schema: Value) -> Value {
    if let Value::Object(obj) = &mut schema {
        obj.entry("x-guidance").or_insert_with(
            || json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}),
        );
    }
    schema
}

/// Checks a JSON schema against the JSON Schema meta-schema, so an error names the path at fault
/// inside it (`response_format.json_schema.schema.properties.age.type`); llguidance's own
/// messages say what is wrong but not where.
pub fn check_schema(schema: &Value, param: &str) -> Result<(), EngineError> {
    if !schema.is_object() && !schema.is_boolean() {
        return Err(EngineError::Invalid {
            param: param.to_string(),
            message: format!("`{param}` must be a JSON schema object"),
        });
    }
    jsonschema::meta::validate(schema).map_err(|e| {
        let mut path = param.to_string();
        for seg in e.instance_path().as_str().split('/').skip(1) {
            let seg = seg.replace("~1", "/").replace("~0", "~");
            if seg.parse::<usize>().is_ok() {
                path.push_str(&format!("[{seg}]"));
            } else {
                path.push('.');
                path.push_str(&seg);
            }
        }
        EngineError::Invalid {
            message: format!("`{path}` is not a valid JSON schema: {e}"),
            param: path,
        }
    })
}

/// The model's vocabulary as llguidance sees it: the bytes of every token, special tokens marked,
/// and the tokenizer for the text a grammar forces.
struct TokEnv {
    trie: TokTrie,
    text: Arc<TextSpec>,
}

impl TokenizerEnv for TokEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.text
                .tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_else(|_| self.trie.greedy_tokenize(s.as_bytes()))
        })
    }
}

/// Builds the trie from the tokenizer's own description (byte-level BPE or byte fallback):
/// `vocab_size` is the model's logits width, which may exceed the tokenizer's (padding slots
/// get no bytes and so are never allowed).
fn tok_env(text: &Arc<TextSpec>, vocab_size: usize) -> Result<Arc<TokEnv>, String> {
    let desc: Value = serde_json::from_str(
        &text
            .tokenizer
            .to_string(false)
            .map_err(|e| format!("serializing the tokenizer: {e}"))?,
    )
    .map_err(|e| format!("reading the tokenizer: {e}"))?;
    let mut words = llguidance::token_bytes_from_tokenizer_json(&desc)
        .map_err(|e| format!("reading the vocabulary: {e}"))?;
    words.resize(words.len().max(vocab_size), Vec::new());
    let eos = *text
        .eos_ids
        .first()
        .ok_or("the model has no end-of-sequence token, so a constrained output could not end")?;
    let mut info = TokRxInfo::new(words.len() as u32, eos);
    info.tok_bos = text.bos_id;
    let trie = TokTrie::from(&info, &words).with_eos_tokens(&text.eos_ids);
    Ok(Arc::new(TokEnv {
        trie,
        text: text.clone(),
    }))
}

/// Compiled grammars kept for reuse, at most this many (then the cache starts over).
const MAX_CACHED: usize = 64;

/// The per-model structured-output state: the parser factory (built on first use) and compiled
/// grammars, shared by every request on the base model and its variants (same vocabulary).
pub struct GrammarCache {
    text: Arc<TextSpec>,
    vocab_size: usize,
    factory: OnceLock<Result<ParserFactory, String>>,
    compiled: Mutex<HashMap<String, Matcher>>,
}

impl GrammarCache {
    pub fn new(text: Arc<TextSpec>, vocab_size: usize) -> Self {
        Self {
            text,
            vocab_size,
            factory: OnceLock::new(),
            compiled: Mutex::new(HashMap::new()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, EngineError> {
        self.factory
            .get_or_init(|| {
                let started = std::time::Instant::now();
                let env = tok_env(&self.text, self.vocab_size)?;
                let mut factory = ParserFactory::new_simple(&(env as llguidance::toktrie::TokEnv))
                    .map_err(|e| format!("building the grammar engine: {e}"))?;
                factory.quiet();
                tracing::info!(
                    "structured outputs ready ({} tokens) in {:.2} s",
                    self.vocab_size,
                    started.elapsed().as_secs_f64()
                );
                Ok(factory)
            })
            .as_ref()
            .map_err(|e| EngineError::Internal(e.clone()))
    }

    /// Compiles (or takes from the cache) the grammar of `c` and starts computing its first mask.
    pub fn compile(&self, c: &Constraint) -> Result<Guide, EngineError> {
        if let ConstraintKind::JsonSchema(schema) = &c.kind {
            check_schema(schema, &c.param)?;
        }
        let key = c.key();
        let cached = self
            .compiled
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let matcher = match cached {
            Some(m) => m,
            None => {
                let factory = self.factory()?;
                let m = Matcher::new(factory.create_parser(c.grammar()));
                if let Some(e) = m.get_error() {
                    return Err(EngineError::Invalid {
                        param: c.param.clone(),
                        message: format!("`{}` could not be compiled: {e}", c.param),
                    });
                }
                let mut compiled = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
                if compiled.len() >= MAX_CACHED {
                    compiled.clear();
                }
                compiled.insert(key, m.clone());
                m
            }
        };
        let mut guide = Guide {
            state: State::Idle(Box::new(matcher)),
        };
        guide.start();
        Ok(guide)
    }
}

type MaskResult = (Box<Matcher>, Result<SimpleVob, String>);

enum State {
    /// The matcher is here; no mask is being computed.
    Idle(Box<Matcher>),
    /// The `itamae-masks` thread is computing the next mask.
    Pending(mpsc::Receiver<MaskResult>),
    /// The mask for the next token is ready.
    Ready(Box<Matcher>, SimpleVob),
    /// The matcher was lost (the mask thread died) or failed.
    Broken(String),
}

/// One sequence's grammar state.
pub struct Guide {
    state: State,
}

/// Work for the mask thread.
type Task = Box<dyn FnOnce() + Send>;

fn mask_thread() -> &'static Mutex<mpsc::Sender<Task>> {
    static TX: OnceLock<Mutex<mpsc::Sender<Task>>> = OnceLock::new();
    TX.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Task>();
        let spawned = std::thread::Builder::new()
            .name("itamae-masks".into())
            .spawn(move || {
                while let Ok(task) = rx.recv() {
                    task();
                }
            });
        if let Err(e) = spawned {
            tracing::error!("could not start the mask thread: {e}");
        }
        Mutex::new(tx)
    })
}

impl Guide {
    /// Hands the matcher to the mask thread to compute the next mask.
    fn start(&mut self) {
        let State::Idle(_) = &self.state else {
            return;
        };
        let State::Idle(mut matcher) =
            std::mem::replace(&mut self.state, State::Broken(String::new()))
        else {
            return;
        };
        let (tx, rx) = mpsc::sync_channel::<MaskResult>(1);
        let task: Task = Box::new(move || {
            let mask = matcher.compute_mask_or_eos().map_err(|e| e.to_string());
            let _ = tx.send((matcher, mask));
        });
        let sent = mask_thread()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(task);
        self.state = match sent {
            Ok(()) => State::Pending(rx),
            Err(_) => State::Broken("the mask thread has stopped".into()),
        };
    }

    /// Waits for the next mask and sets every disallowed logit to −∞.
    pub fn apply(&mut self, logits: &mut [f32]) -> Result<(), String> {
        if let State::Pending(rx) = &self.state {
            self.state = match rx.recv() {
                Ok((m, Ok(mask))) => State::Ready(m, mask),
                Ok((_, Err(e))) => State::Broken(format!("the output grammar failed: {e}")),
                Err(_) => State::Broken("the mask thread has stopped".into()),
            };
        }
        match &self.state {
            State::Ready(_, mask) => {
                if mask.num_set() == 0 {
                    return Err("the output grammar allows no further token".into());
                }
                mask_logits(mask, logits);
                Ok(())
            }
            State::Broken(e) => Err(e.clone()),
            State::Idle(_) | State::Pending(_) => Err("no mask was computed".into()),
        }
    }

    /// Advances the grammar by the sampled token and starts the next mask. Returns true when
    /// the grammar is complete (only end-of-sequence may follow).
    pub fn commit(&mut self, token: u32) -> Result<bool, String> {
        let State::Ready(mut m, _) =
            std::mem::replace(&mut self.state, State::Broken(String::new()))
        else {
            return Err("no mask was computed for this token".into());
        };
        m.consume_token(token)
            .map_err(|e| format!("the output grammar rejected a token: {e}"))?;
        let done = m.is_stopped();
        self.state = State::Idle(m);
        if !done {
            self.start();
        }
        Ok(done)
    }
}

/// −∞ for every token the mask disallows (and for logits past the mask's vocabulary).
pub fn mask_logits(mask: &SimpleVob, logits: &mut [f32]) {
    let n = mask.len().min(logits.len());
    for (i, l) in logits[..n].iter_mut().enumerate() {
        if !mask.is_allowed(i as u32) {
            *l = f32::NEG_INFINITY;
        }
    }
    for l in &mut logits[n..] {
        *l = f32::NEG_INFINITY;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::fixtures::spec;

    fn cache() -> GrammarCache {
        let text = Arc::new(spec());
        let n = text.tokenizer.get_vocab_size(true);
        GrammarCache::new(text, n + 5)
    }

    fn constraint(kind: ConstraintKind) -> Constraint {
        Constraint {
            kind,
            param: "guided_regex".into(),
        }
    }

    /// Drives a guide with "logits" that prefer the tokens of `wanted` in order, or else any
    /// allowed token; returns the text produced.
    fn run(cache: &GrammarCache, c: &Constraint, prefer: &str) -> String {
        let text = &cache.text;
        let mut g = cache.compile(c).expect("compile");
        let mut out = Vec::new();
        let prefer = text.tokenizer.encode(prefer, false).expect("encode");
        let mut prefer = prefer.get_ids().iter().copied();
        for _ in 0..200 {
            let mut logits = vec![0.0f32; cache.vocab_size];
            if let Some(p) = prefer.next() {
                logits[p as usize] = 10.0;
            }
            g.apply(&mut logits).expect("mask");
            let id = crate::engine::sampling::argmax(&logits);
            if text.eos_ids.contains(&id) {
                break;
            }
            out.push(id);
            if g.commit(id).expect("commit") {
                break;
            }
        }
        text.tokenizer.decode(&out, false).expect("decode")
    }

    #[test]
    fn regex_and_choice_bound_the_output() {
        let c = cache();
        let rx = constraint(ConstraintKind::Regex("[0-9]{3}-[a-z]+".into()));
        // the preferred text breaks the pattern at its 2nd byte: the grammar overrides it
        let out = run(&c, &rx, "1x3-ab");
        assert!(
            regex::Regex::new("^[0-9]{3}-[a-z]+$")
                .expect("rx")
                .is_match(&out),
            "{out:?}"
        );
        let choice = constraint(ConstraintKind::Choice(vec![
            "yes (a.k.a. *)".into(),
            "no".into(),
        ]));
        assert_eq!(run(&c, &choice, "yes (a.k.a. *)"), "yes (a.k.a. *)");
        assert_eq!(run(&c, &choice, "n"), "no");
    }

    #[test]
    fn json_schema_output_validates() {
        let c = cache();
        let schema = json!({
            "type": "object",
            "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
                           "kind": {"enum": ["a", "b"]}},
            "required": ["name", "n", "kind"],
            "additionalProperties": false
        });
        let k = Constraint {
            kind: ConstraintKind::JsonSchema(schema.clone()),
            param: "response_format.json_schema.schema".into(),
        };
        let out = run(&c, &k, "{\"name\": \"x\", \"n\": 1");
        let v: Value = serde_json::from_str(&out).expect(&out);
        assert!(jsonschema::is_valid(&schema, &v), "{out}");
        // compiled once, then reused
        assert_eq!(c.compiled.lock().expect("lock").len(), 1);
        run(&c, &k, "");
        assert_eq!(c.compiled.lock().expect("lock").len(), 1);
    }

    #[test]
    fn invalid_constraints_name_the_field() {
        let c = cache();
        let bad = Constraint {
            kind: ConstraintKind::JsonSchema(json!({
                "type": "object", "properties": {"age": {"type": "integr"}}
            })),
            param: "response_format.json_schema.schema".into(),
        };
        let Err(EngineError::Invalid { param, .. }) = c.compile(&bad) else {
            panic!("accepted a bad schema");
        };
        assert_eq!(
            param,
            "response_format.json_schema.schema.properties.age.type"
        );
        let Err(EngineError::Invalid { param, .. }) =
            c.compile(&constraint(ConstraintKind::Regex("(unclosed".into())))
        else {
            panic!("accepted a bad regex");
        };
        assert_eq!(param, "guided_regex");
        let grammar = Constraint {
            kind: ConstraintKind::Lark("start: undefined_rule".into()),
            param: "guided_grammar".into(),
        };
        assert!(matches!(
            c.compile(&grammar),
            Err(EngineError::Invalid { param, .. }) if param == "guided_grammar"
        ));
    }

    #[test]
    fn a_forced_tool_call_parses_and_matches_the_parameters() {
        use crate::engine::tools::{Piece, ToolCallParser, ToolChoice, Tools};
        let c = cache();
        let params = json!({"type": "object", "properties": {
            "city": {"type": "string", "maxLength": 6}}, "required": ["city"],
            "additionalProperties": false});
        let tools = Tools {
            defs: vec![
                json!({"type": "function", "function": {"name": "weather", "parameters": params}}),
                json!({"type": "function", "function": {"name": "time"}}),
            ],
            choice: ToolChoice::Function("weather".into()),
            parallel: true,
        };
        let forced = tools.forced().expect("a grammar");
        // the preferred text names the other tool: the grammar overrides it
        let out = run(&c, &forced, "<tool_call>\n{\"name\": \"time");
        let mut parser = ToolCallParser::new();
        let mut pieces = parser.push(&out);
        pieces.extend(parser.finish());
        let [Piece::Call(call)] = pieces.as_slice() else {
            panic!("{out:?} gave {pieces:?}");
        };
        assert_eq!(call.name, "weather");
        let args: Value = serde_json::from_str(&call.arguments).expect("arguments");
        assert!(jsonschema::is_valid(&params, &args), "{args}");
    }

    #[test]
    fn masking_leaves_only_allowed_tokens() {
        let mut mask = SimpleVob::alloc(6);
        mask.allow_token(1);
        mask.allow_token(4);
        let mut logits = vec![1.0f32; 8];
        mask_logits(&mask, &mut logits);
        let allowed: Vec<usize> = (0..8).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(allowed, [1, 4]);
    }
}
