"""BBEH-style answer normalisation and exact-match scoring.

Mirrors the reference evaluation of BIG-Bench Extra Hard (google-deepmind/bbeh,
``bbeh/evaluate.py``): lower-case, strip LaTeX wrappers, a trailing period and markdown bold,
then a "fuzzy" exact match that tolerates ``(a)`` vs ``a``, numeric formatting, quotes,
brackets and a trailing question mark. The answer-*extraction* step of that file is the
trainable ``extract_answer`` parameter here; its default is :data:`DEFAULT_EXTRACTOR`.
"""

from __future__ import annotations

DEFAULT_EXTRACTOR = '''def extract_answer(response: str) -> str:
    """Return the final answer contained in the model's response text."""
    answer = response
    for prefix in ["The answer is:", "The final answer is ", "The final answer is: ", "The answer is "]:
        if prefix in answer:
            answer = answer.split(prefix)[-1].strip()
    if answer.endswith("."):
        answer = answer[:-1]
    return answer.strip()
'''


def strip_latex(response: str) -> str:
    if response.startswith("$") and response.endswith("$"):
        response = response[1:-1]
    for marker in ("boxed{", "texttt{", "text{"):
        if marker in response and response.endswith("}"):
            response = response[:-1].split(marker)[1]
    return response


def normalise_prediction(answer: str) -> str:
    prediction = strip_latex(answer.strip()).lower()
    prediction = prediction.replace(", ", ",").replace("**", "")
    prediction = prediction.split("\n")[0].strip()
    return prediction[:-1] if prediction.endswith(".") else prediction


def normalise_reference(reference: str) -> str:
    return str(reference).strip().lower().replace(", ", ",")


def fuzzy_match(prediction: str, reference: str) -> bool:
    if prediction == reference:
        return True
    if len(prediction) == 3 and prediction[0] == "(" and prediction[-1] == ")":
        return prediction[1] == reference
    if len(reference) == 3 and reference[0] == "(" and reference[-1] == ")":
        return reference[1] == prediction
    try:
        if float(prediction) == float(reference):
            return True
    except ValueError:
        pass
    if prediction.replace("'", "") == reference.replace("'", ""):
        return True
    if f"[{reference}]" == prediction or f"[{prediction}]" == reference:
        return True
    return prediction.endswith("?") and prediction[:-1] == reference


def is_correct(extracted_answer: str, reference: str) -> bool:
    return fuzzy_match(normalise_prediction(extracted_answer), normalise_reference(reference))
