"""`kvpilot bench spec`: its copy-heavy prompts and one plain-vs-speculative row on the tiny model."""

from kvpilot.serving import LLM
from kvpilot.serving.bench import spec
from kvpilot.serving.bench.workload import read_text


def test_prompts_alternate_paragraphs_and_code_edits():
    prompts = spec.copy_prompts(4, tokenizer=None, chat_template=None)
    text = read_text()
    assert [p.split("\n\n", 1)[1] in text for p in prompts] == [True, False, True, False]
    assert all("def " in p for p in prompts[1::2])
    assert len(set(prompts)) == 4


def test_a_row_compares_both_modes_on_the_same_prompts(tiny_llama):
    llm = LLM(model=str(tiny_llama), num_kv_blocks=256, speculative_ngram=1, num_speculative_tokens=2)
    prompts = spec.copy_prompts(3, llm.get_tokenizer(), llm.llm_engine.chat_template)
    plain_run, spec_run = spec.compare(llm, prompts, batch=2, max_tokens=6)
    assert len(plain_run.outputs) == 3 and plain_run.outputs == spec_run.outputs
    assert plain_run.num_draft_tokens == 0 and llm.llm_engine.proposer is not None
    row = spec.format_row(2, plain_run, spec_run).split()
    assert row[:3] == ["2", "3", str(plain_run.num_tokens)] and row[-1] == "yes"
