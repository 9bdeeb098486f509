//! Tokenization with per-token loss weights, and the train/validation split.
//!
//! A chat's trained tokens are found by rendering the conversation, and its prefixes, through the
//! same [`ChatTemplate::render_with_tools`] call serving uses for a chat request: the spans that
//! carry loss are exactly the assistant turns as the model will produce them when served.
use std::ops::Range;

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde_json::Value;

use super::jsonl::{DataOptions, Record};
use crate::model::chat::{ChatMessage, Role};
use crate::model::{ChatTemplate, TextSpec};

/// One tokenized example. `weights[i]` is 1 when token `i` is a training target (predicted from
/// the tokens before it), else 0; `weights[0]` is always 0 since nothing precedes it.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Example {
    /// Number of tokens that carry loss.
    pub fn trainable(&self) -> usize {
        self.weights.iter().filter(|&&w| w > 0.0).count()
    }
}

/// Turns checked records into examples.
pub(super) struct Tokenize<'a> {
    pub text: &'a TextSpec,
    pub template: Option<&'a ChatTemplate>,
    pub opts: &'a DataOptions,
}

impl Tokenize<'_> {
    fn encode(&self, s: &str) -> Result<tokenizers::Encoding, String> {
        self.text
            .tokenizer
            .encode(s, false)
            .map_err(|e| format!("tokenizer: {e}"))
    }

    /// Chat templates write BOS themselves; raw text gets it only when the model asks for it.
    fn bos(&self) -> Option<u32> {
        self.text.bos_id.filter(|_| self.text.add_bos)
    }

    /// Returns the example and whether it was truncated.
    pub fn example(&self, record: &Record) -> Result<(Example, bool), String> {
        let (ids, weights) = match record {
            Record::Chat { messages, tools } => self.chat(messages, tools.as_deref())?,
            Record::PromptCompletion { prompt, completion } => {
                let prompt = self.encode(prompt)?;
                let completion = self.encode(completion)?;
                let mut ids: Vec<u32> = self.bos().into_iter().collect();
                ids.extend_from_slice(prompt.get_ids());
                let mut weights = vec![0.0; ids.len()];
                ids.extend_from_slice(completion.get_ids());
                ids.extend(self.text.eos_ids.first());
                weights.resize(ids.len(), 1.0);
                (ids, weights)
            }
            Record::Text(text) => {
                let enc = self.encode(text)?;
                let mut ids: Vec<u32> = self.bos().into_iter().collect();
                ids.extend_from_slice(enc.get_ids());
                ids.extend(self.text.eos_ids.first());
                let weights = vec![1.0; ids.len()];
                (ids, weights)
            }
        };
        self.finish(ids, weights)
    }

    fn chat(
        &self,
        messages: &[ChatMessage],
        tools: Option<&[Value]>,
    ) -> Result<(Vec<u32>, Vec<f32>), String> {
        let template = self
            .template
            .ok_or("chat data needs a chat template, but the model has none")?;
        let (full, spans) = render_chat(template, messages, tools)?;
        let enc = self.encode(&full)?;
        let weights = enc
            .get_offsets()
            .iter()
            .map(|&(_, end)| {
                // A token straddling a span's start belongs to the span when it ends inside it.
                let inside = spans.iter().any(|s| end > s.start && end <= s.end);
                if inside {
                    1.0
                } else {
                    0.0
                }
            })
            .collect();
        Ok((enc.get_ids().to_vec(), weights))
    }

    fn finish(&self, mut ids: Vec<u32>, mut weights: Vec<f32>) -> Result<(Example, bool), String> {
        if let Some(w) = weights.first_mut() {
            *w = 0.0;
        }
        if !weights.iter().any(|&w| w > 0.0) {
            return Err("no trainable token".to_string());
        }
        let max = self.opts.max_seq_len;
        let len = ids.len();
        let truncated = len > max;
        if truncated {
            if !self.opts.truncation {
                return Err(format!(
                    "{len} tokens exceed max_seq_len {max} (truncation is off)"
                ));
            }
            ids.truncate(max);
            weights.truncate(max);
            if !weights.iter().any(|&w| w > 0.0) {
                return Err(format!(
                    "no trainable token within the first {max} tokens (max_seq_len) of {len}"
                ));
            }
        }
        Ok((Example { ids, weights }, truncated))
    }
}

/// Renders a conversation for training: the whole text, and the byte spans of the assistant
/// turns that carry loss. Each span is found by rendering the conversation up to the turn with the
/// generation prompt (what serving renders for a chat request ending there) and through the turn.
pub(crate) fn render_chat(
    template: &ChatTemplate,
    messages: &[ChatMessage],
    tools: Option<&[Value]>,
) -> Result<(String, Vec<Range<usize>>), String> {
    let trained: Vec<usize> = (0..messages.len())
        .filter(|&i| messages[i].role == Role::Assistant && messages[i].weight != 0.0)
        .collect();
    if trained.is_empty() {
        return Err("no trainable token: every assistant message has weight 0".into());
    }
    let render = |msgs: &[ChatMessage], generation_prompt: bool| {
        template
            .render_with_tools(msgs, tools, generation_prompt)
            .map_err(|e| e.to_string())
    };
    let full = render(messages, false)?;
    let mut spans: Vec<Range<usize>> = Vec::with_capacity(trained.len());
    for k in trained {
        let before = render(&messages[..k], true)?;
        let upto = render(&messages[..=k], false)?;
        if !upto.starts_with(&before) || !full.starts_with(&upto) {
            return Err(format!(
                "the chat template is not prefix-stable at messages[{k}]: rendering the \
                 conversation up to this assistant message is not a prefix of rendering all \
                 of it, so the assistant's tokens cannot be located"
            ));
        }
        // The turn's end marker is trained (the model must learn to stop) but not the
        // separator the template writes after it, which belongs to the next turn's layout.
        let turn = upto[before.len()..].trim_end();
        spans.push(before.len()..before.len() + turn.len());
    }
    Ok((full, spans))
}

/// Splits off a validation set: a deterministic (by `seed`) random `fraction` of the examples, at
/// least one when `fraction > 0` and there are two or more, and never all of them. Both sets keep
/// the original order.
pub fn split_validation(
    examples: Vec<Example>,
    fraction: f64,
    seed: u64,
) -> (Vec<Example>, Vec<Example>) {
    let n = examples.len();
    // NaN is not greater than zero either.
    if n < 2 || fraction.is_nan() || fraction <= 0.0 {
        return (examples, Vec::new());
    }
    let wanted = (n as f64 * fraction.min(1.0)).round() as usize;
    let n_valid = wanted.clamp(1, n - 1);
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut StdRng::seed_from_u64(seed));
    let mut is_valid = vec![false; n];
    for &i in &order[..n_valid] {
        is_valid[i] = true;
    }
    let (mut train, mut valid) = (Vec::with_capacity(n - n_valid), Vec::with_capacity(n_valid));
    for (ex, v) in examples.into_iter().zip(is_valid) {
        if v {
            valid.push(ex);
        } else {
            train.push(ex);
        }
    }
    (train, valid)
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::*;
    use super::super::jsonl::{parse_line, read_jsonl};
    use super::super::DataFormat;
    use super::*;
    use crate::model::chat::{self, Dialect};
    use serde_json::json;

    const CONVERSATION: &str = r#"{"messages":[{"role":"system","content":"Be brief."},{"role":"user","content":"Hi"},{"role":"assistant","content":"Hello there!"},{"role":"user","content":"Fish?"},{"role":"assistant","content":"Tuna, señor 🍣."}]}"#;

    #[test]
    fn chatml_spans_cover_assistant_content_and_end_marker() {
        let (examples, report) = load_ok(CONVERSATION, Some(&chatml()));
        assert_eq!(report.format, Some(DataFormat::Chat));
        assert_eq!(report.examples, 1);
        let ex = &examples[0];
        assert_eq!(
            trained_runs(ex),
            ["Hello there!<|im_end|>", "Tuna, señor 🍣.<|im_end|>"]
        );
        let full = chatml()
            .render(
                &serde_json::from_str::<Value>(CONVERSATION).expect("json")["messages"]
                    .as_array()
                    .expect("messages")
                    .clone(),
                false,
            )
            .expect("render");
        assert_eq!(
            spec().tokenizer.decode(&ex.ids, false).expect("decode"),
            full
        );
        assert_eq!(report.tokens, ex.ids.len());
        assert_eq!(report.trainable_tokens, ex.trainable());
        // The newline after each `<|im_end|>` is not trained.
        for (i, &id) in ex.ids.iter().enumerate() {
            if id == IM_END && ex.weights[i] > 0.0 {
                assert_eq!(ex.weights[i + 1], 0.0);
            }
        }
    }

    #[test]
    fn qwen_spans_follow_the_template_stripping_content() {
        let data = r#"{"messages":[{"role":"user","content":"2+2?"},{"role":"assistant","content":"  four \n"},{"role":"user","content":"and 3+3?"},{"role":"assistant","content":"six"}]}"#;
        let (examples, _) = load_ok(data, Some(&qwen()));
        assert_eq!(
            trained_runs(&examples[0]),
            ["four<|im_end|>", "six<|im_end|>"]
        );
        // The same data through ChatML keeps the content as written.
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(
            trained_runs(&examples[0]),
            ["  four \n<|im_end|>", "six<|im_end|>"]
        );
    }

    #[test]
    fn weight_zero_assistant_messages_are_not_trained() {
        let data = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"skip me","weight":0},{"role":"user","content":"b"},{"role":"assistant","content":"learn me","weight":1}]}"#;
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(trained_runs(&examples[0]), ["learn me<|im_end|>"]);
        let data = r#"{"messages":[{"role":"user","content":"a"},{"role":"assistant","content":"skip me","weight":0}]}"#;
        let errs = errors(data, Some(&chatml()), &DataOptions::default());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("no trainable token"), "{errs:?}");
    }

    #[test]
    fn tool_turns_are_context_not_targets() {
        let data = r#"{"messages":[{"role":"user","content":"weather?"},{"role":"assistant","content":"","tool_calls":[{"id":"c1","type":"function","function":{"name":"w","arguments":"{}"}}],"weight":0},{"role":"tool","content":"sunny","tool_call_id":"c1"},{"role":"assistant","content":"Sunny."}]}"#;
        let (examples, _) = load_ok(data, Some(&chatml()));
        assert_eq!(trained_runs(&examples[0]), ["Sunny.<|im_end|>"]);
        // A template that refuses the tool role reports its own message on that line.
        let errs = errors(data, Some(&qwen()), &DataOptions::default());
        assert_eq!(errs[0].line, 1);
        assert!(
            errs[0].message.contains("Unsupported role: tool"),
            "{errs:?}"
        );
    }

    /// Serving renders a chat request as the API reads it (the same parser) through the same
    /// template call as training (the engine's `render(messages, true)`): a conversation served
    /// is the conversation trained on, followed by the generation prompt.
    #[test]
    fn serving_renders_the_training_conversation_plus_the_generation_prompt() {
        let messages = json!([
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Weather"}, {"type": "text", "text": "in Kyoto?"}], "name": "ann"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "c1"},
            {"role": "assistant", "content": "Sunny."},
            {"role": "user", "content": "Thanks!"},
        ]);
        // Prints every field a message carries, so a field one side dropped would show.
        let every_field = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}:{{ m | tojson }}|{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}",
            "",
            "",
        )
        .expect("template");
        let served = chat::parse_messages(Some(&messages), Dialect::Api).expect("request");
        let line = json!({ "messages": messages }).to_string();
        let Record::Chat {
            messages: trained,
            tools,
        } = parse_line(line.as_bytes()).record.expect("dataset line")
        else {
            panic!("not a chat line");
        };
        assert_eq!(trained, served);
        for (template, generation_prompt) in [
            (&every_field, "assistant:"),
            (&chatml(), "<|im_start|>assistant\n"),
        ] {
            let prompt = template.render(&served, true).expect("serving render");
            let (full, spans) =
                render_chat(template, &trained, tools.as_deref()).expect("training render");
            assert_eq!(prompt, format!("{full}{generation_prompt}"));
            assert_eq!(spans.len(), 2);
            // The training example is exactly these tokens.
            let (examples, _) = load_ok(&line, Some(template));
            assert_eq!(
                spec()
                    .tokenizer
                    .decode(&examples[0].ids, false)
                    .expect("decode"),
                full
            );
        }
        let (full, _) = render_chat(&every_field, &trained, None).expect("render");
        assert!(
            full.contains(r#""tool_calls": [{"id": "c1""#)
                && full.contains(r#""tool_call_id": "c1""#)
                && full.contains(r#""name": "ann""#)
                && full.contains(r#"{"role": "system", "content": "Be brief."}"#)
                && full.contains(r#""content": "Weather\nin Kyoto?""#),
            "{full}"
        );
    }

    /// The same with tools, through the real Qwen2.5 template: the request's `tools` and its
    /// history of calls and results render as the dataset line with those `tools` does (the
    /// engine's `render_with_tools(messages, tools, true)`), calls printed in Qwen's format.
    #[test]
    fn serving_with_tools_renders_the_training_conversation_plus_the_generation_prompt() {
        let qwen25 = ChatTemplate::new(
            include_str!("../../../../tests/fixtures/qwen2.5-chat-template.jinja"),
            "",
            "<|im_end|>",
        )
        .expect("template");
        let tools = json!([{"type": "function", "function": {"name": "get_weather",
            "description": "Weather of a city", "parameters": {"type": "object",
            "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let messages = json!([
            {"role": "user", "content": "Weather in Kyoto?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1",
                "type": "function", "function": {"name": "get_weather",
                "arguments": "{\"city\": \"Kyoto\"}"}}]},
            {"role": "tool", "content": "sunny, 21 C", "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is sunny in Kyoto."},
            {"role": "user", "content": "And tomorrow?"},
        ]);
        let served = chat::parse_messages(Some(&messages), Dialect::Api).expect("request");
        let served_tools = tools.as_array().expect("array").clone();
        let prompt = qwen25
            .render_with_tools(&served, Some(&served_tools), true)
            .expect("serving render");
        let line = json!({"messages": messages, "tools": tools}).to_string();
        let Record::Chat {
            messages: trained,
            tools: trained_tools,
        } = parse_line(line.as_bytes()).record.expect("dataset line")
        else {
            panic!("not a chat line");
        };
        let (full, spans) =
            render_chat(&qwen25, &trained, trained_tools.as_deref()).expect("training render");
        assert_eq!(prompt, format!("{full}<|im_start|>assistant\n"));
        assert_eq!(spans.len(), 2);
        for part in [
            "<tools>\n{\"type\": \"function\", \"function\": {\"name\": \"get_weather\"",
            "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Kyoto\"}}\n</tool_call><|im_end|>",
            "<|im_start|>user\n<tool_response>\nsunny, 21 C\n</tool_response><|im_end|>",
        ] {
            assert!(full.contains(part), "{part} not in {full}");
        }
    }

    #[test]
    fn template_that_is_not_prefix_stable_is_reported() {
        let t = ChatTemplate::new(
            "{{ messages | length }}{% for m in messages %}[{{ m.content }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}",
            "",
            "",
        )
        .expect("template");
        let errs = errors(CONVERSATION, Some(&t), &DataOptions::default());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.contains("not prefix-stable"), "{errs:?}");
    }

    #[test]
    fn chat_without_template_is_an_error() {
        let errs = errors(CONVERSATION, None, &DataOptions::default());
        assert!(errs[0].message.contains("chat template"), "{errs:?}");
    }

    #[test]
    fn prompt_completion_trains_completion_and_eos() {
        let data = "{\"prompt\":\"Q: \",\"completion\":\"A!\"}\n\n\n{\"prompt\":\"\",\"completion\":\"x\"}\n";
        let (examples, report) = load_ok(data, None);
        assert_eq!(report.format, Some(DataFormat::PromptCompletion));
        assert_eq!(report.examples, 2);
        let ex = &examples[0];
        assert_eq!(*ex.ids.last().expect("eos"), IM_END);
        assert_eq!(ex.weights, [0., 0., 0., 1., 1., 1.]);
        assert_eq!(trained_runs(ex), ["A!<|im_end|>"]);
        // Without a prompt the first completion token has nothing to be predicted from.
        assert_eq!(examples[1].weights, [0., 1.]);

        let mut with_bos = spec();
        with_bos.add_bos = true;
        let (examples, _) =
            read_jsonl(data.as_bytes(), &with_bos, None, &DataOptions::default()).expect("load");
        assert_eq!(examples[1].ids.len(), 3);
        assert_eq!(examples[1].ids[0], IM_START);
        assert_eq!(examples[1].ids[2], IM_END);
        assert_eq!(examples[1].weights, [0., 1., 1.]);
    }

    #[test]
    fn text_trains_everything_after_the_first_token() {
        let (examples, report) = load_ok("{\"text\":\"abc\"}", None);
        assert_eq!(report.format, Some(DataFormat::Text));
        assert_eq!(examples[0].ids.len(), 4);
        assert_eq!(examples[0].weights, [0., 1., 1., 1.]);
        assert_eq!(report.trainable_tokens, 3);
        let errs = errors(
            "{\"text\":\"\"}\n{\"text\":7}",
            None,
            &DataOptions::default(),
        );
        assert!(errs[0].message.contains("empty `text`"), "{errs:?}");
        assert!(errs[1].message.contains("must be a string"), "{errs:?}");
    }

    #[test]
    fn truncation_cuts_or_rejects_long_examples() {
        let data = "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"abcdefgh\",\"completion\":\"ij\"}";
        let opts = DataOptions {
            max_seq_len: 6,
            ..Default::default()
        };
        let errs = errors(data, None, &opts);
        // Line 1 keeps trainable tokens after the cut; line 2's completion is cut off entirely.
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 2);
        assert!(errs[0].message.contains("within the first 6"), "{errs:?}");

        let (examples, report) = load(
            "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"a\",\"completion\":\"b\"}",
            None,
            &opts,
        )
        .expect("load");
        assert_eq!(report.truncated, 1);
        assert_eq!(examples[0].ids.len(), 6);
        assert_eq!(examples[0].weights, [0., 0., 1., 1., 1., 1.]);
        assert_eq!(report.tokens, 6 + 3);

        let off = DataOptions {
            truncation: false,
            ..opts
        };
        let errs = errors(
            "{\"prompt\":\"ab\",\"completion\":\"cdefghij\"}\n{\"prompt\":\"a\",\"completion\":\"b\"}",
            None,
            &off,
        );
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 1);
        assert!(errs[0].message.contains("exceed max_seq_len 6"), "{errs:?}");
    }

    #[test]
    fn split_is_deterministic_and_never_empty() {
        let ex = numbered(10, |_| 3);
        let (t1, v1) = split_validation(ex.clone(), 0.2, 7);
        let (t2, v2) = split_validation(ex.clone(), 0.2, 7);
        assert_eq!((&t1, &v1), (&t2, &v2));
        assert_eq!((t1.len(), v1.len()), (8, 2));
        let others: Vec<_> = (8..12)
            .map(|seed| split_validation(ex.clone(), 0.2, seed).1)
            .collect();
        assert!(
            others.iter().any(|v| *v != v1),
            "the seed changes the split"
        );
        let (t, v) = split_validation(ex.clone(), 0.01, 1);
        assert_eq!((t.len(), v.len()), (9, 1));
        let (t, v) = split_validation(ex.clone(), 1.0, 1);
        assert_eq!((t.len(), v.len()), (1, 9));
        let (t, v) = split_validation(ex.clone(), 0.0, 1);
        assert_eq!((t.len(), v.len()), (10, 0));
        let (t, v) = split_validation(ex[..1].to_vec(), 0.5, 1);
        assert_eq!((t.len(), v.len()), (1, 0));
    }
}
