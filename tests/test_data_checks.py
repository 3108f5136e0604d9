"""What fedbip_hub.training.data refuses before any tokenizer or model: empty files, malformed
JSON Lines (by physical line number), missing columns and bad labels."""

from __future__ import annotations

import datasets
import pytest

from fedbip_hub.errors import ConfigError
from fedbip_hub.training.data import check_examples
from fedbip_hub.training.data_files import load_examples


@pytest.mark.parametrize(("name", "text", "needle"), [
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n  \n", "is empty"),
    ("empty.csv", "", "is empty"),
    ("bad.jsonl", '{"text": "a", "label": 0}\n\n{"text": "b", "label": 1\n', "line 3 "),
    ("list.jsonl", '{"text": "a", "label": 0}\n[1, 2]\n', "line 2 is a JSON list"),
    ("lines.json", '{"text": "a", "label": 0}\n{"text": "b" "label": 1}\n', "line 2 "),
])
def test_bad_files_are_refused_with_the_line(tmp_path, name, text, needle):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle) as err:
        load_examples(path)
    assert str(path) in err.value.message and err.value.hint


def test_good_json_forms_still_load(tmp_path):
    (tmp_path / "a.json").write_text('[{"text": "a", "label": 0}, {"text": "b", "label": 1}]')
    (tmp_path / "b.jsonl").write_text('{"text": "a", "label": 0}\n\n{"text": "b", "label": 1}\n')
    assert len(load_examples(tmp_path / "a.json")) == 2
    assert len(load_examples(tmp_path / "b.jsonl")) == 2


def test_check_examples_finds_what_prepare_would_refuse():
    ds = datasets.Dataset.from_list([{"text": "a", "label": 0}, {"text": "b", "label": 5}])
    check_examples(ds, task_type="SEQ_CLS", num_labels=6)  # in range: fine
    with pytest.raises(ConfigError, match=r"example 1: label 5 is outside 0\.\.2"):
        check_examples(ds, task_type="SEQ_CLS", num_labels=3)
    with pytest.raises(ConfigError, match="no 'y' column"):
        check_examples(ds, task_type="SEQ_CLS", num_labels=6, label_field="y")
    with pytest.raises(ConfigError, match="no input_ids or 'body'"):
        check_examples(ds, task_type="CAUSAL_LM", text_field="body")
    check_examples(ds, task_type="CAUSAL_LM")  # no labels needed for a causal LM
    named = datasets.Dataset.from_list([{"text": "a", "label": "positive"}])
    with pytest.raises(ConfigError, match="not a class id"):
        check_examples(named, task_type="SEQ_CLS", num_labels=2)


def test_check_examples_accepts_every_causal_lm_format_prepare_accepts():
    """The pre-load check and prepare_dataset agree: chat and prompt/completion data pass
    both for a causal LM, and neither is taken as classification input."""
    chat = datasets.Dataset.from_list([{"messages": [{"role": "user", "content": "hi"},
                                                     {"role": "assistant", "content": "yo"}]}])
    pairs = datasets.Dataset.from_list([{"prompt": "2+2=", "completion": "4"}])
    for ds in (chat, pairs):
        check_examples(ds, task_type="CAUSAL_LM")
        with pytest.raises(ConfigError, match="no input_ids or 'text'"):
            check_examples(ds, task_type="SEQ_CLS", num_labels=2)
