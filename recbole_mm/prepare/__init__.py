"""Data preparation: ``python -m recbole_mm.prepare <command>`` (see ``--help``).

Commands
--------
``mmrec``   MMRec-format data (``<ds>.inter`` with ``userID itemID rating timestamp x_label``,
            ``<m>_feat.npy`` whose row i is itemID i) -> RecBole atomic files + features,
            keeping the ``x_label`` split.
``amazon``  RecBole's Amazon atomic files (``.inter`` + ``.item`` with title/brand/categories)
            -> an iterative user/item k-core of them.
``text``    ``text_feat.npy`` from text fields of ``.item`` with a sentence-transformers model,
            cached by a hash of the texts.
``images``  ``image_feat.npy`` + ``image_mask.npy`` from a folder of item images with a local
            TorchScript (or torchvision state_dict) model.
``stats``   Checks and statistics of a prepared dataset.

Every command checks its data with the loader's own checks (:mod:`recbole_mm.data.dataset`)
before it writes; datasets are written into a hidden sibling folder that is renamed into place
only when complete, and nothing that exists is replaced without ``--force``.
"""
