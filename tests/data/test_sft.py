"""Your own data (eora_ft.data.sft): TRL's dataset types detected, loaded from every file type, split without
leaks, and tokenized with the loss mask TRL itself builds."""

import json

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from eora_ft.data import sft

NANO = "eora_ft/assets/models/nano-llama-5m"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3+3?"},
        {"role": "assistant", "content": "It is 6."}]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(NANO)


@pytest.fixture
def chat_tokenizer():
    tok = AutoTokenizer.from_pretrained(NANO)
    sft.ensure_chat_template(tok)
    return tok


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.mark.parametrize("records, layout", [
    ([{"text": "a b c"}], "language_modeling"),
    ([{"prompt": "Q: 1+1?", "completion": " 2"}], "prompt_completion"),
    ([{"messages": CHAT}], "conversational"),
    ([{"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}], "conversational"),
    ([{"prompt": CHAT[:2], "completion": [CHAT[2]]}], "conversational_prompt_completion"),
])
def test_each_trl_layout_is_detected(records, layout):
    assert sft.detect_layout(datasets.Dataset.from_list(records)) == layout


def test_columns_that_fit_no_layout_are_refused_naming_them_and_the_accepted_ones():
    with pytest.raises(ValueError, match=r"columns \['question', 'answer'\].*accepted layouts: language_modeling: text"):
        sft.detect_layout(datasets.Dataset.from_list([{"question": "q", "answer": "a"}]))


def test_sharegpt_conversations_become_chatml_messages():
    data = datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "hello"}], "id": 3}])
    normalised, layout = sft.normalise(data)
    assert layout == "conversational" and normalised.column_names == ["messages"]
    assert normalised[0]["messages"] == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_every_local_file_type_and_a_directory_load_the_same_records(tmp_path, suffix):
    records = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(6)]
    table = datasets.Dataset.from_list(records)
    path = tmp_path / "data" / f"part{suffix}"
    path.parent.mkdir()
    if suffix == ".jsonl":
        _write_jsonl(path, records)
    elif suffix == ".json":
        path.write_text(json.dumps(records))
    elif suffix == ".parquet":
        table.to_parquet(str(path))
    else:
        table.to_csv(str(path), index=False)
    for source in (path, path.parent):
        assert sft.load_sft_source(str(source)).to_list() == records


def test_a_missing_local_path_names_itself(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        sft.load_sft_source(str(tmp_path / "nowhere.jsonl"))


def test_without_a_test_split_a_seeded_share_is_held_out_and_never_trained_on(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(50)])
    train, held, origin = sft.load_sft_splits(str(path), eval_split_fraction=0.2, eval_split_seed=3)
    again = sft.load_sft_splits(str(path), eval_split_fraction=0.2, eval_split_seed=3)
    other = sft.load_sft_splits(str(path), eval_split_fraction=0.2, eval_split_seed=4)
    assert len(held) == 10 and len(train) == 40
    assert not set(train["prompt"]) & set(held["prompt"])
    assert held["prompt"] == again[1]["prompt"] and held["prompt"] != other[1]["prompt"]
    assert "0.2 of" in origin and "seed 3" in origin
    limited = sft.load_sft_splits(str(path), eval_split_fraction=0.2, eval_split_seed=3, train_limit=5, eval_limit=2)
    assert limited[0]["prompt"] == train["prompt"][:5] and limited[1]["prompt"] == held["prompt"][:2]


def test_an_eval_file_in_another_layout_is_refused(tmp_path):
    train = _write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Q:", "completion": " A"}] * 4)
    held = _write_jsonl(tmp_path / "e.jsonl", [{"text": "plain"}] * 2)
    with pytest.raises(ValueError, match="is language_modeling, the training data .* is prompt_completion"):
        sft.load_sft_splits(str(train), eval_dataset_name=str(held))


def test_the_default_chat_template_adds_no_token(tokenizer, chat_tokenizer):
    assert len(chat_tokenizer) == len(tokenizer) and chat_tokenizer.get_vocab() == tokenizer.get_vocab()
    ids, mask = sft.assistant_mask(chat_tokenizer, CHAT)
    assert max(ids) < len(tokenizer)
    text = chat_tokenizer.decode(ids)
    assert text == ("Be brief.\n\nUser: What is 2+2?\nAssistant: 4.<|endoftext|>User: And 3+3?\nAssistant: It is 6."
                    "<|endoftext|>")
    assert chat_tokenizer.decode([i for i, bit in zip(ids, mask) if bit]) == " 4.<|endoftext|> It is 6.<|endoftext|>"


def test_prefix_located_assistant_turns_equal_the_generation_markers_mask(chat_tokenizer):
    marked = sft.assistant_mask(chat_tokenizer, CHAT)
    chat_tokenizer.chat_template = sft.DEFAULT_CHAT_TEMPLATE.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    assert sft.assistant_mask(chat_tokenizer, CHAT) == marked


def test_a_template_that_rewrites_earlier_turns_is_refused(chat_tokenizer):
    # renders only the last assistant turn's content: the conversation up to turn 1 is not a prefix of the whole
    chat_tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
                                    "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endif %}{% endfor %}")
    with pytest.raises(ValueError, match="not prefix-preserving"):
        sft.assistant_mask(chat_tokenizer, CHAT)


def _trl_labels(tokenizer, records, **config):
    """The labels TRL's SFTTrainer builds for ``records`` (its own tokenization and masking)."""
    from trl import SFTConfig, SFTTrainer

    model = AutoModelForCausalLM.from_pretrained(NANO)
    args = SFTConfig(output_dir="/tmp/unused", report_to="none", max_length=None, use_cpu=True,
                     dataset_num_proc=None, **config)
    trainer = SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(records),
                         processing_class=tokenizer)
    return [list(row) for row in trainer.train_dataset["labels"]]


def _our_labels(tokenizer, records, completion_only=True):
    tokenized = sft.tokenize_sft(datasets.Dataset.from_list(records), tokenizer, None, completion_only)
    return [[t if m else -100 for t, m in zip(row["input_ids"], row["completion_mask"])] for row in tokenized]


@pytest.mark.parametrize("records, config", [
    ([{"prompt": "Question: 1+1?\nAnswer:", "completion": " 2"}, {"prompt": "Q: sky?", "completion": " blue"}], {}),
    ([{"text": "Some running text."}], {}),
    ([{"messages": CHAT}, {"messages": CHAT[1:3]}], {"assistant_only_loss": True}),
    ([{"prompt": CHAT[:2], "completion": [CHAT[2]]}], {}),
])
def test_our_tokenization_and_loss_mask_equal_trls(chat_tokenizer, records, config):
    assert _our_labels(chat_tokenizer, records) == _trl_labels(chat_tokenizer, records, **config)


def test_completion_only_follows_trls_flags():
    messages = datasets.Dataset.from_list([{"messages": CHAT}])
    pairs = datasets.Dataset.from_list([{"prompt": "Q", "completion": " A"}])
    text = datasets.Dataset.from_list([{"text": "t"}])
    assert sft.completion_only(messages, None, True) and not sft.completion_only(messages, True, False)
    assert sft.completion_only(pairs, None, False) and not sft.completion_only(pairs, False, True)
    assert not sft.completion_only(text, None, False)


def test_loss_on_every_token_when_completion_only_is_off(chat_tokenizer):
    rows = sft.tokenize_sft(datasets.Dataset.from_list([{"messages": CHAT}]), chat_tokenizer, None, False)
    assert all(rows[0]["completion_mask"])


def test_truncation_keeps_the_start_and_drops_examples_left_without_a_loss_token(chat_tokenizer):
    records = [{"prompt": "word " * 40, "completion": " end"}, {"prompt": "Q:", "completion": " A"}]
    kept = sft.tokenize_sft(datasets.Dataset.from_list(records), chat_tokenizer, 8)
    assert len(kept) == 1 and kept[0]["input_ids"] == chat_tokenizer("Q: A<|endoftext|>")["input_ids"]
    with pytest.raises(ValueError, match="max_length=8"):
        sft.tokenize_sft(datasets.Dataset.from_list(records[:1]), chat_tokenizer, 8)


def test_rendered_texts_are_the_trained_text(chat_tokenizer):
    tokenized = sft.tokenize_sft(datasets.Dataset.from_list([{"messages": CHAT}]), chat_tokenizer, None)
    text = sft.rendered_texts(tokenized, chat_tokenizer)[0]
    assert chat_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenized[0]["input_ids"]
    assert torch.tensor(tokenized[0]["completion_mask"]).sum() > 0


class _BosTokenizer:
    """A tokenizer that puts BOS (id 1) before plain text, as Llama-2's and Mistral's do."""

    bos_token_id, chat_template = 1, None

    def __call__(self, text):
        return {"input_ids": [1, 42]}


def test_the_default_template_starts_with_bos_exactly_when_the_tokenizer_adds_it(tokenizer):
    bos = _BosTokenizer()
    assert sft.ensure_chat_template(bos) and bos.chat_template == "{{ bos_token }}" + sft.DEFAULT_CHAT_TEMPLATE
    plain = AutoTokenizer.from_pretrained(NANO)  # adds no BOS to text: none in conversations either
    sft.ensure_chat_template(plain)
    assert plain.chat_template == sft.DEFAULT_CHAT_TEMPLATE


def test_chat_template_path_replaces_the_tokenizers_template(tmp_path, chat_tokenizer):
    path = tmp_path / "t.jinja"
    path.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    assert sft.ensure_chat_template(chat_tokenizer, str(path))
    assert chat_tokenizer.decode(sft.assistant_mask(chat_tokenizer, CHAT[1:3])[0]) == "[user] What is 2+2?\n[assistant] 4.\n"


def test_keep_end_truncation_keeps_the_last_tokens(chat_tokenizer):
    records = [{"prompt": "word " * 40, "completion": " end"}]
    kept = sft.tokenize_sft(datasets.Dataset.from_list(records), chat_tokenizer, 4, truncation_mode="keep_end")
    whole = sft.tokenize_sft(datasets.Dataset.from_list(records), chat_tokenizer, None)
    assert kept[0]["input_ids"] == whole[0]["input_ids"][-4:] and kept[0]["completion_mask"][-1] == 1


def test_trl_settings_the_task_would_ignore_are_refused():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="dataset_text_field='content'"):
        sft.check_sft_options(SimpleNamespace(dataset_text_field="content", eos_token=None))
    with pytest.raises(ValueError, match="eos_token='<|im_end|>'"):
        sft.check_sft_options(SimpleNamespace(dataset_text_field="text", eos_token="<|im_end|>"))


def test_task_sft_does_not_inherit_the_arc_defaults():
    from eora_ft.config import parse_recipe_args

    task = parse_recipe_args(["--task", "sft", "--dataset_name", "mine.jsonl"])[0]
    assert task.dataset_name == "mine.jsonl" and task.eval_dataset_name is None
    assert parse_recipe_args(["--task", "sft"])[0].dataset_name.endswith("sft/gsm8k_chat.jsonl")


def test_limits_apply_before_conversion(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                                   {"from": "gpt", "value": f"a{i}"}]}
                                               for i in range(30)])
    train, held, _ = sft.load_sft_splits(str(path), train_limit=4, eval_limit=2)
    assert (len(train), len(held)) == (4, 2) and train[0]["messages"][0]["role"] == "user"
