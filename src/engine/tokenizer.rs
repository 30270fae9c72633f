//! CLIP's BPE tokenizer built from a repo's `vocab.json` + `merges.txt`, configured exactly as
//! transformers' `CLIPTokenizer` (NFC, whitespace runs -> one space, lower-case, CLIP's split
//! regex, byte-level BPE with `</w>`), padded/truncated to the model's 77 positions.

use std::path::Path;

use serde::Deserialize;
use tokenizers::{
    models::bpe::BPE,
    normalizers::{
        unicode::NFC, utils::Lowercase, NormalizerWrapper, Replace, Sequence as NormalizerSequence,
    },
    pre_tokenizers::{
        byte_level::ByteLevel,
        sequence::Sequence as PreTokenizerSequence,
        split::{Split, SplitPattern},
        PreTokenizerWrapper,
    },
    AddedToken, SplitDelimiterBehavior, Tokenizer,
};

use crate::engine::error::{EngineError, Result};
use crate::engine::loader::ModelDir;

const CLIP_SPLIT: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

pub struct ClipTokenizer {
    inner: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

/// `"pad_token": "!"` or `"pad_token": {"content": "!", ...}` (both occur in real repos).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Added { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            Self::Plain(s) => s,
            Self::Added { content } => content,
        }
    }
}

#[derive(Deserialize, Default)]
struct TokenizerConfig {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
}

impl ClipTokenizer {
    /// Load from `<model>/<folder>/` (`tokenizer` or `tokenizer_2`).
    pub fn load(dir: &ModelDir, folder: &str) -> Result<Self> {
        let vocab = dir.required(&format!("{folder}/vocab.json"))?;
        let merges = dir.required(&format!("{folder}/merges.txt"))?;
        // special_tokens_map.json wins over tokenizer_config.json, as in transformers.
        let mut config: TokenizerConfig = match dir.file(&format!("{folder}/tokenizer_config.json"))
        {
            p if p.is_file() => crate::engine::loader::read_json(&p)?,
            _ => TokenizerConfig::default(),
        };
        let special_path = dir.file(&format!("{folder}/special_tokens_map.json"));
        if special_path.is_file() {
            let special: TokenizerConfig = crate::engine::loader::read_json(&special_path)?;
            config.bos_token = special.bos_token.or(config.bos_token);
            config.eos_token = special.eos_token.or(config.eos_token);
            config.pad_token = special.pad_token.or(config.pad_token);
            config.unk_token = special.unk_token.or(config.unk_token);
        }
        let text = |t: &Option<TokenSpec>, default: &str| {
            t.as_ref()
                .map(|t| t.content().to_string())
                .unwrap_or_else(|| default.to_string())
        };
        let bos = text(&config.bos_token, "<|startoftext|>");
        let eos = text(&config.eos_token, "<|endoftext|>");
        let unk = text(&config.unk_token, "<|endoftext|>");
        let pad = text(&config.pad_token, &eos);
        // transformers stores 1e30 for "no limit"; CLIP models have 77 positions.
        let max_length = match config.model_max_length {
            Some(n) if (2.0..=4096.0).contains(&n) => n as usize,
            _ => 77,
        };
        Self::from_files(&vocab, &merges, &bos, &eos, &pad, &unk, max_length)
    }

    pub fn from_files(
        vocab: &Path,
        merges: &Path,
        bos: &str,
        eos: &str,
        pad: &str,
        unk: &str,
        max_length: usize,
    ) -> Result<Self> {
        let err = |reason: String| EngineError::Tokenizer {
            path: vocab.to_path_buf(),
            reason,
        };
        let bpe = BPE::from_file(&vocab.to_string_lossy(), &merges.to_string_lossy())
            .continuing_subword_prefix(String::new())
            .end_of_word_suffix("</w>".to_string())
            .unk_token(unk.to_string())
            .fuse_unk(false)
            .build()
            .map_err(|e| err(format!("cannot build BPE from vocab.json/merges.txt: {e}")))?;
        let mut inner = Tokenizer::new(bpe);
        let whitespace = Replace::new(
            tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
            " ",
        )
        .map_err(|e| err(e.to_string()))?;
        inner.with_normalizer(Some(NormalizerSequence::new(vec![
            NormalizerWrapper::NFC(NFC),
            NormalizerWrapper::Replace(whitespace),
            NormalizerWrapper::Lowercase(Lowercase),
        ])));
        let split = Split::new(
            SplitPattern::Regex(CLIP_SPLIT.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| err(e.to_string()))?;
        inner.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
            PreTokenizerWrapper::Split(split),
            PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, true, true)),
        ])));
        // transformers registers bos/eos/unk/pad as special tokens: they are matched in the raw
        // text before normalisation and never merged with neighbours (this matters for SD2's "!").
        let specials: Vec<AddedToken> = [bos, eos, unk, pad]
            .iter()
            .map(|t| AddedToken::from(t.to_string(), true))
            .collect();
        inner.add_special_tokens(&specials);
        let id = |t: &str| {
            inner
                .token_to_id(t)
                .ok_or_else(|| err(format!("token `{t}` is not in the vocabulary")))
        };
        let (bos_id, eos_id, pad_id) = (id(bos)?, id(eos)?, id(pad)?);
        Ok(Self {
            inner,
            bos_id,
            eos_id,
            pad_id,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// `tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids`
    pub fn encode_padded(&self, text: &str) -> Result<Vec<u32>> {
        self.encode_counting_cut(text).map(|(ids, _)| ids)
    }

    /// The padded ids and how many prompt tokens truncation cut (diffusers warns about those).
    pub fn encode_counting_cut(&self, text: &str) -> Result<(Vec<u32>, usize)> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer {
                path: "tokenizer".into(),
                reason: e.to_string(),
            })?;
        let content = encoding.get_ids();
        let keep = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok((ids, content.len() - keep))
    }
}

/// T5's tokenizer (SD3's `tokenizer_3`, FLUX's `tokenizer_2`) from the repo's `tokenizer.json`,
/// run as transformers 5's `T5Tokenizer` runs it: it keeps the file's Unigram vocabulary and
/// sentencepiece `Precompiled` normaliser but *replaces* the rest of the pipeline with
/// WhitespaceSplit + Metaspace("▁", always), then appends `</s>` (older files also carry a
/// `Replace(" {2,}")` normaliser and a bare Metaspace, which would split runs of spaces
/// differently). Truncation keeps `</s>`; padding with `<pad>` to a fixed length.
pub struct T5Tokenizer {
    inner: Tokenizer,
    pad_id: u32,
    eos_id: u32,
}

impl T5Tokenizer {
    pub fn load(dir: &ModelDir, folder: &str) -> Result<Self> {
        let path = dir.required(&format!("{folder}/tokenizer.json"))?;
        let bad = |reason: String| EngineError::Tokenizer {
            path: path.clone(),
            reason,
        };
        let mut json: serde_json::Value = crate::engine::loader::read_json(&path)?;
        fn find_precompiled(v: &serde_json::Value) -> Option<serde_json::Value> {
            if v["type"] == "Precompiled" {
                return Some(v.clone());
            }
            v["normalizers"]
                .as_array()?
                .iter()
                .find_map(find_precompiled)
        }
        let normalizer = find_precompiled(&json["normalizer"]).unwrap_or(serde_json::Value::Null);
        let eos_id = json["model"]["vocab"]
            .as_array()
            .and_then(|v| v.iter().position(|p| p[0] == "</s>"))
            .unwrap_or(1);
        json["normalizer"] = normalizer;
        json["pre_tokenizer"] = serde_json::json!({
            "type": "Sequence",
            "pretokenizers": [
                {"type": "WhitespaceSplit"},
                {"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "always", "split": true}
            ]
        });
        let inner: Tokenizer = json
            .to_string()
            .parse()
            .map_err(|e: tokenizers::Error| bad(e.to_string()))?;
        let pad_id = inner.token_to_id("<pad>").unwrap_or(0);
        Ok(Self {
            inner,
            pad_id,
            eos_id: eos_id as u32,
        })
    }

    /// Token ids of exactly `max_length` positions: the text's tokens cut to leave room for
    /// `</s>` (what truncation does with the `$A </s>` template), `</s>`, then `<pad>`s.
    pub fn encode_padded(&self, text: &str, max_length: usize) -> Result<Vec<u32>> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|e| EngineError::Tokenizer {
                path: "tokenizer.json".into(),
                reason: e.to_string(),
            })?;
        let mut ids = encoding.get_ids().to_vec();
        ids.truncate(max_length.saturating_sub(1));
        ids.push(self.eos_id);
        ids.resize(max_length, self.pad_id);
        Ok(ids)
    }
}
