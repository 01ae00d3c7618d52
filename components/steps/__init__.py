"""The pipeline's steps, one module (or package) each, each exporting its ``STEP`` spec; a
step imports ``components.core``, ``model`` and ``evaluation``, never another step."""
