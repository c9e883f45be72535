"""``python -m custom_nets <command>``: the project's command line (fire)."""

from __future__ import annotations

import fire


def main() -> None:
    # Imported on use, so ``--help`` of one command does not load the others' dependencies.
    from custom_nets.data.brats import brats_studies_command
    from custom_nets.engines.scaleout import merge_results_command
    from custom_nets.engines.stream import stream_command
    from custom_nets.tracking.architectures import architectures_command
    from custom_nets.tracking.compare import compare_command
    from custom_nets.tracking.crossval import crossval_command, crossval_compare_command

    fire.Fire(
        {
            "compare": compare_command,
            "architectures": architectures_command,
            "crossval": crossval_command,
            "crossval_compare": crossval_compare_command,
            "stream": stream_command,
            "merge_results": merge_results_command,
            "brats_studies": brats_studies_command,
        }
    )


if __name__ == "__main__":
    main()
