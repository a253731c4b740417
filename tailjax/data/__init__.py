"""Datasets for both studies.

Study A: ``mvtec`` (MVTec AD layout reader, the shared ``ImageSplit``), ``visa``
(VisA split CSV), ``textures`` (the embedded texture benchmark, written in the
MVTec layout), ``features`` (content-hashed backbone feature cache; reader for
user-supplied ``.npz`` features). Import the submodule you need; this package
imports nothing so that each stays cheap to load.
"""
