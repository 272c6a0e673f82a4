"""Imported by the grading pool's forkserver only: parse typical answers once, before forking.

math-verify's LaTeX parser (antlr) fills a prediction cache on first use, which makes the first
few hundred answers several times slower. Filling it in the forkserver means every worker, and
every replacement of a killed worker, starts warm.
"""

from hpt_megatron.rewards.math_grader import math_reward

_SAMPLES = [
    ("\\boxed{\\frac{1}{2}}", "0.75"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "(3,\\pi)"),
    ("\\boxed{2\\sqrt{3}+x^2}", "\\sqrt{12}"),
    ("\\boxed{[0,1) \\cup (2, \\infty)}", "(0,1]"),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 3 \\end{pmatrix}"),
    ("\\boxed{y = 2x + 1}", "2x-1"),
    ("\\boxed{10^{\\circ}}", "\\text{A}"),
    ("\\boxed{-2,1}", "1,2"),
    ("\\boxed{\\binom{2n}{n}}", "n!"),
    ("\\boxed{f(x)=2x}", "x^2"),
]
for _response, _truth in _SAMPLES:
    math_reward(_response, _truth)
