"""Torch-free results layer: the case registry, the record schema and builder, the comparison rule
and the merge.

Everything here runs in nox's own interpreter, which may have no torch at all, so nothing in this
package imports torch or transformers (a unit test proves it).
"""
