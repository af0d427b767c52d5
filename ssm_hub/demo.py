"""The main job, ``ssm-hub demo``: turn a transformer into a faster hybrid and check what it kept. With no
arguments and no network it trains a small Llama teacher for about a minute on the CPU on English text that ships
with Python (``pydoc_data.topics``), seeds an ssm_hub_hybrid from it (one attention layer in four kept, the others
become Mamba-2 layers built from their attention weights), distils it (hidden-state alignment, then token KL),
evaluates teacher and student on held-out documents, saves, reloads the student with AutoModelForCausalLM and
generates.

    ssm-hub demo                                   # a few minutes on a laptop CPU, writes ./ssm-hub-demo
    ssm-hub demo --teacher-steps 80 --align-steps 20 --kl-steps 40 --output /tmp/demo    # a quick look
    ssm-hub demo --teacher Qwen/Qwen2.5-0.5B --data notes.txt     # a real teacher and your text

Folders written under the output: teacher/ (when the demo trains one), seeded/ (the student before distillation),
distilled/ (the student, distillation.json with every evaluation, each stage's checkpoints and loss curve). An
output folder that holds anything is refused unless ``--overwrite`` is given, which replaces what an earlier demo
wrote there and nothing else.
"""

import math
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import ssm_hub  # noqa: F401  (registers the ssm_hub model types with the Auto classes)
from ssm_hub.conversion.formats.checkpoint import check_model_reference
from ssm_hub.conversion.distillation.distill import distill, evaluate_against_teacher, report_lines
from ssm_hub.conversion.seeding.from_attention import seed_hybrid
from ssm_hub.models.checkpoint_loading import from_pretrained_safetensors
from ssm_hub.output_folder import claim_output_folder
from ssm_hub.training.config import DataSection
from ssm_hub.training.data import read_documents, train_and_eval_datasets, train_tokenizer

PROMPT = "The import statement"
TEACHER = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=384, max_position_embeddings=4096, tie_word_embeddings=False)


def train_teacher(folder: Path, data: DataSection, steps: int, seed: int, log) -> Path:
    """A small Llama trained for ``steps`` optimizer steps on ``data``'s training documents (the held-out ones stay unseen), with a
    2048-token byte-level BPE trained on the same text; saved with its tokenizer to ``folder``."""
    torch.manual_seed(seed)
    documents = read_documents(data)
    tokenizer = train_tokenizer(documents, vocab_size=2048)
    train, held_out = train_and_eval_datasets(documents, tokenizer, data)
    config = AutoConfig.for_model("llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **TEACHER)
    model = AutoModelForCausalLM.from_config(config)
    log(f"teacher: LlamaForCausalLM, {model.num_parameters():,} parameters, {config.num_hidden_layers} layers; "
        f"{len(train)} training rows of {data.seq_len} tokens from {len(documents)} documents")
    batch_size, peak_lr, warmup = 16, 3e-3, 20
    optimizer = torch.optim.AdamW(model.parameters(), lr=peak_lr, weight_decay=0.1, betas=(0.9, 0.95))
    model.train()
    started = time.perf_counter()
    # A budget in steps, not seconds: the teacher, and so every number the demo prints, is the same on a loaded
    # machine as on an idle one.
    for step in range(steps):
        rows = [train[int(index)] for index in torch.randint(len(train), (batch_size,))]
        ids = torch.stack([row["input_ids"] for row in rows])
        positions = torch.stack([row["position_ids"] for row in rows])
        progress = step / steps
        lr = peak_lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if (step + 1) % 25 == 0:
            log(f"  teacher step {step + 1:4d}  loss {loss.item():.3f}  {time.perf_counter() - started:5.1f}s")
    log(f"teacher trained {steps} steps in {time.perf_counter() - started:.0f}s")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _kept_layer(teacher: str | Path) -> str:
    """One attention layer in four, the last of each four (layer 3, 7, ...): every:4:3, or the last layer of a
    teacher with fewer."""
    layers = AutoConfig.from_pretrained(teacher).num_hidden_layers
    return "every:4:3" if layers >= 4 else str(layers - 1)


def check_settings(teacher: str | None, teacher_steps: int, align_steps: int, kl_steps: int,
                   speed_contexts) -> None:
    """Every value the demo takes, checked before it trains or writes anything."""
    if teacher is None and (isinstance(teacher_steps, bool) or not isinstance(teacher_steps, int)
                            or teacher_steps < 1):
        raise ValueError(f"teacher_steps must be a whole number of at least 1, got {teacher_steps!r}")
    for name, steps in (("align_steps", align_steps), ("kl_steps", kl_steps)):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{name} must be a whole number of at least 0, got {steps!r}")
    if any(not isinstance(context, int) or context < 1 for context in speed_contexts):
        raise ValueError(f"speed_contexts must be positive token counts, got {list(speed_contexts)}")
    if teacher is not None:
        check_model_reference(teacher, "teacher")
        if Path(teacher).is_dir() and not (Path(teacher) / "config.json").is_file():
            raise ValueError(f"the teacher {teacher} has no config.json: give a model folder or a Hub model id")


def run_demo(output_dir: str = "ssm-hub-demo", teacher: str | None = None, data: list[str] | None = None,
             teacher_steps: int = 500, align_steps: int = 100, kl_steps: int = 200, seed: int = 0,
             speed_contexts: tuple[int, ...] = (512, 2048), log=print, overwrite: bool = False) -> dict:
    """Run the demo (module docstring), timing teacher and student at ``speed_contexts`` tokens of context at the
    end; returns {"teacher", "attention_layers", "evaluations", "samples", "speed", "reload_exact", "completion",
    "output_dir"}. Every value is checked, and ``output_dir`` must be empty or ``overwrite`` given
    (ssm_hub.output_folder), before any work."""
    data_section = DataSection(files=list(data or []), builtin=None if data else "python_docs", seq_len=128,
                               eval_fraction=0.05)
    data_section.check()
    data_section.check_files()
    check_settings(teacher, teacher_steps, align_steps, kl_steps, speed_contexts)
    with claim_output_folder(output_dir, "demo", overwrite=overwrite):
        return _run_demo(Path(output_dir), teacher, data_section, teacher_steps, align_steps, kl_steps, seed,
                         speed_contexts, log)


def _run_demo(output: Path, teacher: str | None, data_section: DataSection, teacher_steps: int,
              align_steps: int, kl_steps: int, seed: int, speed_contexts, log) -> dict:
    started = time.perf_counter()
    if teacher is None:
        teacher = train_teacher(output / "teacher", data_section, teacher_steps, seed, log)
    spec = _kept_layer(teacher)
    seeded = seed_hybrid(teacher, output / "seeded", spec)
    kinds = AutoConfig.from_pretrained(seeded).mixer_types
    log(f"seeded an ssm_hub_hybrid from the teacher (--attention-layers {spec}): {kinds}")
    report = distill(str(teacher), str(seeded), data_section, str(output / "distilled"), align_steps=align_steps,
                     kl_steps=kl_steps, seed=seed, speed_contexts=speed_contexts)

    distilled = output / "distilled"
    student = AutoModelForCausalLM.from_pretrained(distilled).eval()
    tokenizer = AutoTokenizer.from_pretrained(distilled)
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    generated = student.generate(ids, max_new_tokens=30, do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    completion = tokenizer.decode(generated[0], skip_special_tokens=True)
    # The reloaded student must score the held-out rows exactly as the student did before it was saved, on the
    # device distill evaluated it on.
    last = list(report["evaluations"])[-1]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, held_out = train_and_eval_datasets(read_documents(data_section), tokenizer, data_section)
    teacher_model = from_pretrained_safetensors(AutoModelForCausalLM, teacher).to(device).eval()
    reloaded = evaluate_against_teacher(student.to(device), teacher_model, held_out)
    reload_exact = reloaded["student_perplexity"] == report["evaluations"][last]["student_perplexity"]

    log("")
    for line in report_lines(report):
        log(line)
    for sample in report["samples"][last][:2]:
        log(f"\nprompt:  {sample['prompt']!r}\nteacher: {sample['teacher']!r}\nstudent: {sample['student']!r}")
    log(f"\nreloaded {type(student).__name__} from {distilled}/ with AutoModelForCausalLM: held-out perplexity "
        f"{reloaded['student_perplexity']:.2f} (as before saving: {reload_exact}); greedy generation:\n  {completion!r}")
    log(f"done in {time.perf_counter() - started:.0f}s")
    return {"teacher": str(teacher), "attention_layers": spec, "evaluations": report["evaluations"],
            "samples": report["samples"], "speed": report.get("speed", []), "reload_exact": reload_exact,
            "completion": completion, "output_dir": str(output)}
