"""`python -m dit360.app.view pano.png [--out pano.html]`: a panorama's 360 viewer page."""

from .cli import handle_signals, run_main

if __name__ == "__main__":  # before torch loads, as the scripts: every end is one line
    handle_signals()
    from .outputs import view_main

    run_main(view_main)
