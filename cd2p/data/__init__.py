"""Raw formats -> datasets: ScanNet ``.sens`` and scene files, synthetic generators, pairs.

Import the submodules directly (``cd2p.data.sens``, ``cd2p.data.synthetic``, ...); this
package itself imports nothing heavy.
"""
