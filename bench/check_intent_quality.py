#!/usr/bin/env python3
"""Validate bench/intent_quality.json: a "search by intent" quality test set.

Rules checked:
  * shape: {"skills": [...], "queries": [...]}, required fields and types,
    unique skill_id, every query's "expect" refers to an existing skill;
  * sizes: query 4-15 words, description 10-25 words, 1-3 capabilities and
    1-3 specializations per skill;
  * no shared content word: a query must not share any content word with its
    target skill's text (name + domain + description + capabilities +
    specializations). Tokens are lowercase alphanumeric runs; stopwords and
    1-character tokens are ignored; a trailing "s" then a trailing "ing"/"ed"
    is stripped before comparing (so "grapes" ~ "grape", "picking" ~ "pick").

Exit 0 and print a summary when everything passes, exit 1 and print every
violation otherwise. Pure python3 stdlib.

Usage: python3 bench/check_intent_quality.py [path/to/intent_quality.json]
"""
import json
import os
import re
import sys
from collections import Counter

STOPWORDS = set("""
a about above after again against all also am an and any are as at be because
been before being below between both but by can cannot could did do does doing
done down during each either else ever every few for from further get gets got
had has have having he her here hers herself him himself his how i if in into
is it its itself just let like me might more most much must my myself need no
nor not now of off on once only or other others our ours ourselves out over own
per please same she should so some such than that the their theirs them
themselves then there these they this those through to too under until up upon
us very via was we were what when where which while who whom whose why will
with within without would you your yours yourself yourselves
isn aren wasn weren don doesn didn won wouldn shouldn couldn ll ve re
""".split())

TOKEN_RE = re.compile(r"[a-z0-9]+")


def stem(tok):
    if len(tok) > 3 and tok.endswith("s") and not tok.endswith("ss"):
        tok = tok[:-1]
    if len(tok) > 5 and tok.endswith("ing"):
        tok = tok[:-3]
    elif len(tok) > 4 and tok.endswith("ed"):
        tok = tok[:-2]
    return tok


def content_words(text):
    """Map stem -> set of surface tokens, for non-stopword tokens."""
    out = {}
    for tok in TOKEN_RE.findall(text.lower()):
        if len(tok) < 2 or tok in STOPWORDS:
            continue
        out.setdefault(stem(tok), set()).add(tok)
    return out


def skill_text(s):
    parts = [s["name"], s["domain"], s["description"]]
    parts += list(s["capabilities"]) + list(s["specializations"])
    return " ".join(parts)


def nwords(text):
    return len(text.split())


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "intent_quality.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)

    errors = []
    if not isinstance(data, dict) or not isinstance(data.get("skills"), list) \
            or not isinstance(data.get("queries"), list):
        print("FAIL: top level must be {\"skills\": [...], \"queries\": [...]}")
        return 1

    skills = {}
    str_fields = ("skill_id", "name", "domain", "description")
    list_fields = ("capabilities", "specializations")
    for i, s in enumerate(data["skills"]):
        where = f"skills[{i}]"
        if not isinstance(s, dict):
            errors.append(f"{where}: not an object")
            continue
        bad = False
        for k in str_fields:
            if not isinstance(s.get(k), str) or not s[k].strip():
                errors.append(f"{where}: missing/empty string field {k!r}")
                bad = True
        for k in list_fields:
            v = s.get(k)
            if not isinstance(v, list) or not all(isinstance(x, str) and x.strip() for x in v):
                errors.append(f"{where}: {k!r} must be a list of non-empty strings")
                bad = True
            elif not 1 <= len(v) <= 3:
                errors.append(f"{where}: {k!r} has {len(v)} items (want 1-3)")
        if bad:
            continue
        sid = s["skill_id"]
        where = f"skill {sid!r}"
        if sid in skills:
            errors.append(f"{where}: duplicate skill_id")
        skills[sid] = s
        n = nwords(s["description"])
        if not 10 <= n <= 25:
            errors.append(f"{where}: description has {n} words (want 10-25)")

    seen_q = set()
    expected = Counter()
    for i, q in enumerate(data["queries"]):
        where = f"queries[{i}]"
        if not isinstance(q, dict) or not isinstance(q.get("query"), str) \
                or not isinstance(q.get("expect"), str):
            errors.append(f"{where}: needs string fields 'query' and 'expect'")
            continue
        text, sid = q["query"], q["expect"]
        if text.lower() in seen_q:
            errors.append(f"{where}: duplicate query {text!r}")
        seen_q.add(text.lower())
        if sid not in skills:
            errors.append(f"{where}: expect {sid!r} is not a known skill_id")
            continue
        expected[sid] += 1
        n = nwords(text)
        if not 4 <= n <= 15:
            errors.append(f"{where}: query has {n} words (want 4-15): {text!r}")
        qw = content_words(text)
        sw = content_words(skill_text(skills[sid]))
        shared = sorted(set(qw) & set(sw))
        if shared:
            detail = ", ".join(
                f"{'/'.join(sorted(qw[k]))}~{'/'.join(sorted(sw[k]))}" for k in shared)
            errors.append(f"{where} -> {sid}: shares content words [{detail}]: {text!r}")

    if errors:
        for e in errors:
            print("VIOLATION:", e)
        print(f"FAIL: {len(errors)} violation(s)")
        return 1

    domains = Counter(s["domain"] for s in skills.values())
    untested = sorted(set(skills) - set(expected))
    print(f"OK: {len(skills)} skills in {len(domains)} domains, "
          f"{len(data['queries'])} queries, no shared content words")
    for d, c in sorted(domains.items()):
        print(f"  {d}: {c} skills")
    if untested:
        print(f"  skills without a query: {', '.join(untested)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
