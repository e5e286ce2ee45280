"""The ``cd2p`` command line: thin click commands over the library."""

from __future__ import annotations

import click

from cd2p import __version__
from cd2p.cli.caption import caption
from cd2p.cli.compare import compare
from cd2p.cli.convert import convert
from cd2p.cli.demo import demo
from cd2p.cli.embed import embed
from cd2p.cli.evaluate import evaluate
from cd2p.cli.export import export
from cd2p.cli.finetune import finetune
from cd2p.cli.hub import pull, push
from cd2p.cli.info import info
from cd2p.cli.plot import plot
from cd2p.cli.predict import predict
from cd2p.cli.prepare import prepare
from cd2p.cli.pretrain import pretrain
from cd2p.cli.recipes import recipes
from cd2p.cli.synthetic import synthetic
from cd2p.cli.zeroshot import zeroshot


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", "-V", prog_name="cd2p")
def main() -> None:
    """cd2p: pre-train 3D point-cloud transformers by distilling 2D image knowledge.

    \b
    Typical workflow:
      cd2p info                              versions, devices, ops backend, cached teacher
      cd2p recipes [show NAME]               the shipped recipes and the paper result of each
      cd2p demo                              the whole pipeline on synthetic data, offline
      cd2p synthetic scannet OUT             a small ScanNet-format dataset (offline demo/tests)
      cd2p prepare scannet ROOT OUT          ScanNet .sens RGB-D videos -> RGB/point-cloud pairs
      cd2p prepare teacher OUT               CLIP + ClipCap targets of the pairs, once
      cd2p pretrain --data OUT --out RUN     distillation pre-training (torchrun for many GPUs)
      cd2p prepare modelnet40|scanobjectnn|shapenetpart|scannet-scenes ROOT DATA
      cd2p finetune TASK --init RUN ...      fine-tune (`cd2p finetune --help` lists the tasks)
      cd2p evaluate TASK --model M --data D  metrics, per-class table, plots
      cd2p compare RUN RUN ...               runs on the same data: mean ± std table and PNG
      cd2p plot RUN                          a run's curves as RUN/metrics.png
      cd2p predict TASK --model M SCAN OUT   your own scan (segmentation, detection)
      cd2p embed --model M CLOUDS --out F    pre-trained features of your own clouds
      cd2p caption --model RUN/student SCAN.ply   a sentence about a scan (ClipCap's GPT-2)
      cd2p zeroshot --model RUN/student --data D  zero-shot classification via CLIP text
      cd2p export RUN                        the whole student of a pre-training run
      cd2p push RUN org/name                 the model and its card on the Hugging Face Hub
      cd2p pull org/name                     a model into the Hugging Face cache
      cd2p convert point-mae|clipcap ...     other checkpoints as cd2p / safetensors models

    Ctrl-C or SIGTERM during pretrain / finetune writes a checkpoint and prints the
    --resume command.
    """


main.add_command(info)
main.add_command(push)
main.add_command(pull)
main.add_command(convert)
main.add_command(prepare)
main.add_command(pretrain)
main.add_command(finetune)
main.add_command(evaluate)
main.add_command(compare)
main.add_command(predict)
main.add_command(embed)
main.add_command(caption)
main.add_command(zeroshot)
main.add_command(export)
main.add_command(synthetic)
main.add_command(plot)
main.add_command(recipes)
main.add_command(demo)
