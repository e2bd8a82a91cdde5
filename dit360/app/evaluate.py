"""`python -m dit360.app.evaluate DIR [DIR or IMAGE ...]`: seam scores of panoramas (`outputs`)."""

from .cli import handle_signals, run_main

if __name__ == "__main__":  # before torch loads, as the scripts: every end is one line
    handle_signals()
    from .outputs import evaluate_main

    run_main(evaluate_main)
