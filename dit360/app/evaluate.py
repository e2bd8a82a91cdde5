"""`python -m dit360.app.evaluate DIR [DIR or IMAGE ...]`: seam scores of panoramas (`outputs`)."""

from .outputs import evaluate_main

if __name__ == "__main__":
    evaluate_main()
