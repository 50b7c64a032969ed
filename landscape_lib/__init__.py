"""landscape_lib: the shared library of the Loss Landscape Book.

One module per concept (see DESIGN.md): ``config`` (profiles, devices, seeds), ``data``,
``models``, ``params`` (weights as dicts, ``functional_call``), ``directions``, ``landscape``
(lines and planes), ``train``, ``claims``, ``viz``; ``runner`` (executing chapters with papermill:
retries, the cache, gathering claims), ``book`` (staging and building the book), ``colab`` (Colab
badges and install cells); ``python -m landscape_lib`` (``__main__``, the command line only) runs
chapters and builds the book.
"""
__version__ = "0.1.0"
