"""`python -m dit360.app.view pano.png [--out pano.html]`: a panorama's 360 viewer page."""

from .outputs import view_main

if __name__ == "__main__":
    view_main()
