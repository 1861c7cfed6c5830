"""Answer extraction, normalisation, equivalence classes and benchmark metrics."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jdelta import answers as A

# (completion, answer_type, expected extracted answer, expected class key)
# The class key is (kind, value): value a float for numbers, a canonical string otherwise.
TABLE = [
    # thinking blocks
    ("<think>The bars are 12 and 30, so 42.</think>\nThe answer is 42.", "auto", "42", ("number", 42.0)),
    ("<think>maybe 5?\nno, 6</think>6", "auto", "6", ("number", 6.0)),
    (
        "Let me look at the chart.\nThe peak is 2019.</think>\n\n**Answer:** 2019",
        "auto",
        "2019",
        ("number", 2019.0),
    ),
    ("<think>The value is clearly 17 ... wait, let me recount the", "auto", "", ("invalid", "empty")),
    ("<THINK>x</THINK> Yes", "auto", "Yes", ("yes_no", "yes")),
    ("<think>a</think><think>b</think>Answer: B", "choice", "B", ("choice", "B")),
    # boxed
    ("So the total is $\\boxed{1,250}$.", "auto", "1,250", ("number", 1250.0)),
    ("\\boxed{\\frac{3}{4}}", "auto", "\\frac{3}{4}", ("number", 0.75)),
    ("First \\boxed{3}, but correcting: \\boxed{4}", "auto", "4", ("number", 4.0)),
    ("\\boxed{\\text{Yes}}", "auto", "Yes", ("yes_no", "yes")),
    ("The result is \\boxed{45\\%}", "auto", "45\\%", ("number", 45.0)),
    ("\\boxed{2.5 \\times 10^{3}}", "auto", "2.5 \\times 10^{3}", ("number", 2500.0)),
    ("\\boxed{\\{1, 2\\}} hmm \\boxed{x^{2}}", "text", "x^{2}", ("text", "x 2")),
    ("<think>\\boxed{9}</think> final: \\boxed{10}", "auto", "10", ("number", 10.0)),
    ("\\fbox{C}", "choice", "C", ("choice", "C")),
    ("**\\boxed{-7}**", "auto", "-7", ("number", -7.0)),
    # answer tags
    ("<answer>Blue</answer>", "auto", "Blue", ("text", "blue")),
    ("reasoning... <answer> 3.50 </answer>", "auto", "3.50", ("number", 3.5)),
    ("<answer>no</answer> <answer>yes</answer>", "yes_no", "yes", ("yes_no", "yes")),
    ("<answer>The Eiffel Tower.", "auto", "The Eiffel Tower", ("text", "eiffel tower")),
    # "Answer:" lines
    ("The chart shows sales.\nAnswer: $3.2 million", "auto", "$3.2 million", ("number", 3.2e6)),
    ("Final answer: twelve", "auto", "twelve", ("number", 12.0)),
    ("Answer: one hundred and five", "auto", "one hundred and five", ("number", 105.0)),
    ("answer: twenty-one apples", "auto", "twenty-one apples", ("number", 21.0)),
    ("Answer:\n  58%", "auto", "58%", ("number", 58.0)),
    ("Answer: 1.2e-3", "auto", "1.2e-3", ("number", 0.0012)),
    ("Answer: −15", "auto", "−15", ("number", -15.0)),
    ("Answer: minus three point five", "auto", "minus three point five", ("number", -3.5)),
    ("Answer: 3/4", "auto", "3/4", ("number", 0.75)),
    ("Answer: 1 1/2 cups", "auto", "1 1/2 cups", ("number", 1.5)),
    ("Answer: approximately 37.5 kg", "auto", "approximately 37.5 kg", ("number", 37.5)),
    ("Answer: 25 °C", "auto", "25 °C", ("number", 25.0)),
    ("Answer: 60 km/h", "auto", "60 km/h", ("number", 60.0)),
    ("Answer: €1.234.567", "auto", "€1.234.567", ("text", "€1 234 567")),
    ("Answer: 12,345,678", "auto", "12,345,678", ("number", 12345678.0)),
    ("Answer: 2,5", "auto", "2,5", ("text", "2 5")),
    ("Answer: USD 40", "auto", "USD 40", ("number", 40.0)),
    ("Answer: 3 apples and 2 oranges", "auto", "3 apples and 2 oranges", ("text", "3 apples and 2 oranges")),
    ("Answer: 5 or 6", "auto", "5 or 6", ("text", "5 or 6")),
    ("Answer: 2019-2020", "auto", "2019-2020", ("text", "2019 2020")),
    ("Answer: 10:30", "auto", "10:30", ("text", "10 30")),
    ("Answer: 7\nAnswer: 8", "auto", "8", ("number", 8.0)),
    ("**Answer**: (B)", "auto", "(B)", ("choice", "B")),
    ("Answer: B. 42 apples", "choice", "B. 42 apples", ("choice", "B")),
    ("Answer: option c", "auto", "option c", ("choice", "C")),
    ("Answer: d", "choice", "d", ("choice", "D")),
    ("Answer: A dog", "auto", "A dog", ("text", "dog")),
    ("Answer: Yes, it is increasing.", "auto", "Yes, it is increasing", ("yes_no", "yes")),
    ("Answer: No.", "auto", "No", ("yes_no", "no")),
    ("Answer: True", "yes_no", "True", ("yes_no", "yes")),
    ("Answer: Not sure", "yes_no", "Not sure", ("invalid", "not_a_yes_no")),
    ("Answer: blue", "number", "blue", ("invalid", "not_a_number")),
    ("Answer: purple", "choice", "purple", ("invalid", "not_a_choice")),
    # "the answer is"
    ("Counting the rows, the answer is 14.", "auto", "14", ("number", 14.0)),
    ("I think the final answer is: **New York City**", "auto", "New York City", ("text", "new york city")),
    ("The correct answer is (A).", "choice", "(A)", ("choice", "A")),
    ("the answer is 0.5 and not 0.6", "auto", "0.5 and not 0.6", ("text", "0 5 and not 0 6")),
    # last line
    ("The bars are 10, 20 and 30.\nTotal: 60\n\n60", "auto", "60", ("number", 60.0)),
    ("Canada", "auto", "Canada", ("text", "canada")),
    ("  The   United  States!  ", "auto", "The   United  States", ("text", "united states")),
    ("'Q3 2019'", "auto", "Q3 2019", ("text", "q3 2019")),
    ("$45$", "auto", "45", ("number", 45.0)),
    ("\\(7.0\\)", "auto", "7.0", ("number", 7.0)),
    ("1.5K", "auto", "1.5K", ("number", 1500.0)),
    ("Answer: 5 m", "auto", "5 m", ("number", 5.0)),
    ("a", "auto", "a", ("text", "a")),
    ("Answer: 3 000", "auto", "3 000", ("number", 3000.0)),
    ("Answer: ½", "auto", "½", ("number", 0.5)),
    ("Answer: 1e400", "auto", "1e400", ("text", "1e400")),
    ("**Answer: 2.5bn**", "auto", "2.5bn", ("number", 2.5e9)),
    ("So, the answer is (B) 12.", "auto", "(B) 12", ("choice", "B")),
    # sentences: lenient second reading for explicit types only
    (
        "<think>\nThe 2019 bar is at 45.2.\n</think>\n\nThe value for 2019 is **45.2%**.",
        "number",
        "The value for 2019 is 45.2%",
        ("number", 45.2),
    ),
    (
        "Sales fell from 1,200 to -350 units",
        "number",
        "Sales fell from 1,200 to -350 units",
        ("number", -350.0),
    ),
    ("It grew in 2019 and 2020.", "number", "It grew in 2019 and 2020", ("number", 2020.0)),
    ("Version 2.0.1 is shown", "number", "Version 2.0.1 is shown", ("invalid", "not_a_number")),
    (
        "The value for 2019 is 45.2%",
        "auto",
        "The value for 2019 is 45.2%",
        ("text", "value for 2019 is 45 2"),
    ),
    (
        "The sign says stop, so no, you cannot park here.",
        "yes_no",
        "The sign says stop, so no, you cannot park here",
        ("yes_no", "no"),
    ),
    (
        "I would say yes, though no label is visible",
        "yes_no",
        "I would say yes, though no label is visible",
        ("invalid", "not_a_yes_no"),
    ),
    (
        "The correct option is (C) because the line peaks there",
        "choice",
        "The correct option is (C) because the line peaks there",
        ("choice", "C"),
    ),
    ("I pick option d over (a)", "choice", "I pick option d over (a)", ("choice", "A")),
    # empty / degenerate
    ("", "auto", "", ("invalid", "empty")),
    ("   \n\n  ", "auto", "", ("invalid", "empty")),
    ("<answer></answer>", "auto", "", ("invalid", "empty")),
    ("...", "auto", "", ("invalid", "empty")),
    ("x" * 400, "auto", "x" * 400, ("invalid", "too_long")),
]


@pytest.mark.parametrize(
    "completion,answer_type,extracted,key", TABLE, ids=[f"row{i}" for i in range(len(TABLE))]
)
def test_extraction_and_normalisation_table(completion, answer_type, extracted, key):
    got = A.extract_answer(completion)
    assert got == extracted
    norm = A.normalize_answer(got, answer_type)
    assert norm.kind == key[0]
    if key[0] == "number":
        assert norm.value == pytest.approx(key[1], rel=1e-12)
    else:
        assert norm.value == key[1]


def test_table_is_large_enough():
    assert len(TABLE) >= 60


def test_class_answers_groups_equivalent_forms():
    teacher = ["\\boxed{1,200}", "Answer: 1200", "1.2 thousand", "<think>hm", "Answer: 1,300"]
    student = ["The answer is 1200.0", "", "Answer: 1300", "Answer: 1301.5", "one thousand two hundred"]
    c = A.class_answers(teacher, student)
    assert c.labels == ["1200", A.INVALID_LABEL, "1300", "1301.5"]
    np.testing.assert_array_equal(c.teacher_counts, [3, 1, 1, 0])
    np.testing.assert_array_equal(c.student_counts, [2, 1, 1, 1])
    np.testing.assert_array_equal(c.teacher_ids, [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(c.student_ids, [0, 1, 2, 3, 0])
    t_counts, s_counts, labels = A.class_answers(teacher, student)
    assert t_counts.sum() == len(teacher) and s_counts.sum() == len(student) and labels == c.labels
    assert c.num_classes == 4


def test_class_answers_number_tolerance():
    # 33.3 and 33.33 are within 1e-3 relative; 33.4 is not.
    c = A.class_answers(["33.3%", "33.33"], ["33.4", "33.3"], answer_type="number")
    assert c.teacher_counts.tolist() == [2, 0] and c.student_counts.tolist() == [1, 1]
    c = A.class_answers(["33.3", "33.33"], ["33.4"], answer_type="number", rel_tol=1e-5)
    assert len(c.labels) == 3


def test_class_answers_rejects_bad_input():
    with pytest.raises(TypeError, match="student_answers"):
        A.class_answers(["1"], "1")
    with pytest.raises(TypeError, match=r"teacher_answers\[1\]"):
        A.class_answers(["1", None], ["1"])
    with pytest.raises(ValueError, match="answer_type"):
        A.class_answers(["1"], ["1"], answer_type="numeric")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.sampled_from(["5", "five", "6", "Yes", "no", "(B)", "blue", "", "5.0", "<think>x"]),
        min_size=1,
        max_size=8,
    ),
    st.lists(st.sampled_from(["5", "6", "Yes", "NO", "B.", "Blue!", "", "7"]), min_size=1, max_size=8),
)
def test_class_answers_counts_add_up_and_are_consistent(teacher, student):
    c = A.class_answers(teacher, student)
    assert c.teacher_counts.sum() == len(teacher) and c.student_counts.sum() == len(student)
    assert len(set(c.labels)) == len(c.labels)
    # Two answers share a class iff their normalised keys agree.
    allans = teacher + student
    ids = np.concatenate([c.teacher_ids, c.student_ids])
    for i in range(len(allans)):
        for j in range(len(allans)):
            ni = A.normalize_completion(allans[i])
            nj = A.normalize_completion(allans[j])
            same = (ni.kind == nj.kind) and (ni.kind == "invalid" or ni.value == nj.value)
            assert (ids[i] == ids[j]) == same


def test_pack_and_batch():
    classed, packed = A.class_answers_batch(
        [["5", "5", "6"], ["(A)", "B"]],
        [["5", "7", "7"], ["(A)", "(A)"]],
        answer_types=["number", "choice"],
        references=["5", "A"],
        metric=["relaxed_accuracy", "mc_accuracy"],
    )
    assert packed.teacher.shape == (2, 3)
    np.testing.assert_array_equal(packed.teacher, [[2, 1, 0], [1, 1, 0]])
    np.testing.assert_array_equal(packed.student, [[1, 0, 2], [2, 0, 0]])
    np.testing.assert_array_equal(packed.mask, [[1, 1, 1], [1, 1, 0]])
    np.testing.assert_array_equal(packed.correct, [[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError, match="prompt 0 has 3 answer classes"):
        A.pack_classed(classed, num_classes=2)
    with pytest.raises(ValueError, match="references"):
        A.class_answers_batch([["1"]], [["1"]], references=["1", "2"])


# ----------------------------------------------------------------------------- metrics


def test_levenshtein_reference_values():
    assert A.levenshtein("kitten", "sitting") == 3
    assert A.levenshtein("", "abc") == 3
    assert A.levenshtein("flaw", "lawn") == 2
    assert A.levenshtein("same", "same") == 0


@settings(max_examples=60, deadline=None)
@given(
    st.text(alphabet="abcd ", max_size=8),
    st.text(alphabet="abcd ", max_size=8),
    st.text(alphabet="abcd", max_size=5),
)
def test_levenshtein_is_a_metric(a, b, c):
    d = A.levenshtein
    assert d(a, b) == d(b, a)
    assert (d(a, b) == 0) == (a == b)
    assert d(a, c) <= d(a, b) + d(b, c)
    assert abs(len(a) - len(b)) <= d(a, b) <= max(len(a), len(b))


def test_anls_worked_examples():
    # ANLS (Biten et al. 2019; DocVQA, InfoVQA): s = 1 - NL, set to 0 when s < 0.5, max over the answers.
    assert A.anls("Georgia", "georgia") == 1.0  # case-insensitive
    assert A.anls("Geogia", "Georgia") == pytest.approx(1 - 1 / 7)  # one deletion in 7 chars
    assert A.anls("1 800 000", "1,800,000") == pytest.approx(1 - 2 / 9)
    assert A.anls("Atlanta", "Georgia") == 0.0  # NL = 6/7 >= 0.5
    assert A.anls("abcd", "abxy") == 0.5  # s = 0.5 exactly is kept (the script zeroes only s < 0.5)
    assert A.anls("abcd", "axyz") == 0.0  # s = 0.25
    assert A.anls("ab", "ax") == 0.5 and A.anls("abc", "axy") == 0.0  # s = 1/3
    assert A.anls("abcd", ["wxyz", "abxy"]) == 0.5  # the best reference, kept at 0.5
    assert A.anls("abcde", "abxde") == pytest.approx(0.8)
    assert A.anls("  New   York ", ["Boston", "new york"]) == 1.0  # max over references
    assert A.anls("Lincoln", ["Abe Lincoln", "lincon"]) == pytest.approx(1 - 1 / 7)
    scores = [
        A.anls(p, r) for p, r in [("Georgia", "Georgia"), ("Geogia", "Georgia"), ("Atlanta", "Georgia")]
    ]
    assert np.mean(scores) == pytest.approx((1 + 6 / 7 + 0) / 3)


def test_relaxed_accuracy_as_published():
    # ChartQA (Masry et al. 2022), reference relaxed_correctness: float() on both strings (a trailing
    # "%" divides by 100); 5% relative tolerance when the target is a non-zero number; otherwise
    # case-insensitive string equality, with no other number parsing.
    ra = A.relaxed_accuracy
    assert ra("104", "100") == 1.0
    assert ra("105", "100") == 1.0  # exactly 5% is still correct
    assert ra("105.1", "100") == 0.0
    assert ra("95", "100") == 1.0 and ra("94.9", "100") == 0.0
    assert ra("-2.05", "-2") == 1.0
    assert ra("45%", "0.45") == 1.0 and ra("0.45", "45%") == 1.0  # trailing % divides by 100
    assert ra("45%", "45") == 0.0
    assert ra("1,200", "1200") == 0.0 and ra("1200", "1,200") == 0.0  # no thousands separators
    assert ra("1,200", "1,200") == 1.0  # ... but equal strings are equal
    assert ra("twelve", "12") == 0.0 and ra("12 kg", "12") == 0.0  # no number words, no units
    assert ra("0.0", "0") == 0.0 and ra("0", "0") == 1.0  # a zero target is a string comparison
    assert ra("1e2", "100") == 1.0 and ra(" 100 ", "100") == 1.0  # whatever float() accepts
    assert ra("Yes", "yes") == 1.0 and ra("Yes.", "yes") == 0.0 and ra("yes ", "yes") == 0.0
    assert ra("Infinity", "infinity") == 0.0  # both read as inf; inf - inf is nan, never <= 5%
    assert ra("nan", "5") == 0.0
    assert ra("2019", ["2020", "2019"]) == 1.0  # best over references
    assert ra("2021", "2020") == 1.0  # years are numbers too: a known looseness of the metric
    assert ra("104", "100", tolerance=0.03) == 0.0


def test_relaxed_accuracy_lenient_reading():
    # The lenient reading (answer classing for Δ): parse_number's numbers, stripped strings.
    ra = lambda p, r: A.relaxed_accuracy(p, r, lenient=True)
    assert ra("1,020", "1000") == 1.0 and ra("twelve", "12") == 1.0 and ra("12 kg", "12") == 1.0
    assert ra("0.0", "0") == 1.0 and ra("0.01", "0") == 0.0  # zero gold: exact as a number
    assert ra("45%", "0.45") == 1.0 and ra("45%", "45") == 0.0
    assert ra("yes ", "yes") == 1.0 and ra("Yes.", "yes") == 0.0
    assert ra("Infinity", "infinity") == 1.0 and ra("nan", "5") == 0.0
    assert A.score_answer("1,200", "1200", "relaxed_accuracy") == 0.0
    assert A.score_answer("1,200", "1200", "relaxed_accuracy", lenient=True) == 1.0


def test_exact_match_and_mc():
    assert A.exact_match("The Eiffel Tower", "eiffel tower!") == 1.0
    assert A.exact_match("5.0", "5") == 1.0 and A.exact_match("5.01", "5") == 0.0
    assert A.exact_match("yes", ["no", "Yes"]) == 1.0
    assert A.exact_match("", "") == 0.0
    assert A.mc_accuracy("(b)", "B") == 1.0 and A.mc_accuracy("B. 42", "B") == 1.0
    assert A.mc_accuracy("C", "B") == 0.0 and A.mc_accuracy("purple", "B") == 0.0


def test_score_against_reference():
    comps = ["<think>x</think>\\boxed{104}", "Answer: 110", "", "The answer is 100."]
    np.testing.assert_array_equal(
        A.score_against_reference(comps, "100", metric="relaxed_accuracy"), [1, 0, 0, 1]
    )
    np.testing.assert_array_equal(A.score_against_reference(comps, "100", metric="exact_match"), [0, 0, 0, 1])
    s = A.score_against_reference(["Answer: Geogia"], ["Georgia"], metric="anls")
    assert s.dtype == np.float32 and s[0] == pytest.approx(6 / 7)
    with pytest.raises(ValueError, match="unknown answer metric 'accuracy'"):
        A.score_against_reference(comps, "1", metric="accuracy")
    with pytest.raises(ValueError, match="at least one reference"):
        A.score_against_reference(comps, [], metric="anls")


def test_class_correctness():
    c = A.class_answers(["Answer: 104", "Answer: 120", "<think>"], ["Answer: 100"])
    np.testing.assert_array_equal(A.class_correctness(c, "100", metric="relaxed_accuracy"), [1, 0, 0, 1])
    np.testing.assert_array_equal(A.class_correctness(c, "100", metric="exact_match"), [0, 0, 0, 1])
    # Classing reads numbers leniently ("1,200" and "1200" are one class, and a correct one) ...
    c = A.class_answers(["1,200", "1200", "1,300"], [])
    assert len(c.labels) == 2
    np.testing.assert_array_equal(A.class_correctness(c, "1200", metric="relaxed_accuracy"), [1, 0])
    # ... unless told to use the published reading
    np.testing.assert_array_equal(
        A.class_correctness(c, "1200", metric="relaxed_accuracy", lenient=False), [0, 0])


@settings(max_examples=80, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text(max_size=12),
            st.sampled_from(
                [
                    "<think>",
                    "</think>",
                    "\\boxed{",
                    "}",
                    "{",
                    "<answer>",
                    "</answer>",
                    "Answer:",
                    "\n",
                    "the answer is",
                    "$",
                    "%",
                    "1,000",
                    "-",
                    "twelve",
                    "(B)",
                    "**",
                    "\\frac{1}{2}",
                    "e5",
                ]
            ),
        ),
        max_size=12,
    )
)
def test_extraction_and_normalisation_never_crash(parts):
    completion = "".join(parts)
    ans = A.extract_answer(completion)
    assert isinstance(ans, str)
    for answer_type in A.ANSWER_TYPES:
        norm = A.normalize_answer(ans, answer_type)
        assert norm.kind in ("number", "yes_no", "choice", "text", "invalid")
        if norm.kind == "number":
            assert np.isfinite(norm.value)
        assert A.normalize_answer(ans, answer_type) == norm  # deterministic
    for metric in A.METRICS:
        assert 0.0 <= A.score_answer(ans, "12", metric) <= 1.0


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.sampled_from(["33.3", "33.33", "33.4", "1e3", "1,000", "Yes", "", "(C)", "blue"]),
        min_size=1,
        max_size=8,
    ),
    st.lists(
        st.sampled_from(["33.31", "33.3%", "1000.4", "no", "C.", "Blue", "x" * 301]), min_size=1, max_size=8
    ),
    st.randoms(use_true_random=False),
)
def test_class_answers_do_not_depend_on_sample_order(teacher, student, rnd):
    def table(c):
        return sorted(zip(c.labels, c.teacher_counts.tolist(), c.student_counts.tolist(), strict=True))

    base = A.class_answers(teacher, student)
    t2, s2 = teacher[:], student[:]
    rnd.shuffle(t2)
    rnd.shuffle(s2)
    assert table(A.class_answers(t2, s2)) == table(base)
    # Swapping the roles swaps the counts and keeps the classes.
    swapped = A.class_answers(student, teacher)
    assert sorted(
        zip(swapped.labels, swapped.student_counts.tolist(), swapped.teacher_counts.tolist(), strict=True)
    ) == table(base)
