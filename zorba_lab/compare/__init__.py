"""The bench beside the product: run modes compared (on the simulator and as real processes),
their statistics, and the results page and plots the benchmarks write (benchmarks/compare.py,
benchmarks/compare_processes.py). Nothing in the product imports this package. It composes the
page's text and draws its figures; the benchmarks write both to docs/ (benchmarks/results_page.py)."""
