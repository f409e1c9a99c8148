"""English evaluation text: Wikipedia articles from the sample dump that the ``gensim`` wheel ships.

Source: ``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``
in ``gensim==4.4.0`` (PyPI), a shortened English Wikipedia XML export (206
pages, revisions of 2016: Anarchism, Autism, Albedo, Abraham Lincoln,
Aristotle, ...). The package's code is LGPL-2.1; the article text is
Wikipedia's, licensed CC BY-SA 3.0 (and GFDL) by the Wikipedia contributors
(https://en.wikipedia.org/wiki/Wikipedia:Copyrights). Nothing is copied into
this repository: the text is read from the installed wheel at run time.
Install with ``pip install --no-deps gensim==4.4.0`` (only the data file is
used; gensim is never imported, so its dependencies are not needed).

:func:`articles` turns each main-namespace, non-redirect page into plain
paragraphs: comments, references, templates ``{{...}}``, tables ``{|...|}``,
files/categories, list and indented lines and HTML tags are removed; links
keep their label; bold/italic quotes are dropped; the article stops at its
first "See also"/"References"/"Notes"/"External links"/... heading; only
paragraphs of at least :data:`MIN_PARAGRAPH_WORDS` words are kept.

:func:`token_windows` makes the evaluation set deterministic: window ``j`` is
the first ``window`` tokens of the ``start + j``-th article (in file order)
that has at least ``window`` tokens, so every window is a different article.

Example:
  >>> from examples.smollm.corpus import strip_wikitext
  >>> strip_wikitext("'''Albedo''' is the [[reflection (physics)|reflection]] coefficient.{{cite}}<ref>x</ref>")
  'Albedo is the reflection coefficient.'
"""

from __future__ import annotations

import bz2
import functools
import html
import importlib.util
import pathlib
import re
import xml.etree.ElementTree as ET
from typing import Any

import numpy as np

__all__ = ['CORPUS_PACKAGE', 'CORPUS_FILE', 'INSTALL_HINT', 'MIN_PARAGRAPH_WORDS', 'missing_reason', 'available',
           'corpus_path', 'strip_wikitext', 'articles', 'token_windows']

CORPUS_PACKAGE = 'gensim'
CORPUS_FILE = 'test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2'
INSTALL_HINT = 'pip install --no-deps gensim==4.4.0'
MIN_PARAGRAPH_WORDS = 20

_STOP_SECTIONS = {'see also', 'references', 'notes', 'external links', 'further reading', 'bibliography',
                  'sources', 'footnotes', 'citations', 'notes and references', 'works cited'}
_DROP_LINK_PREFIXES = ('file:', 'image:', 'category:', 'media:', 'wikipedia:', 'wp:', 'help:', 'template:',
                       'portal:', 'wikt:', 'wiktionary:', 's:', 'q:', 'commons:', 'special:')


def missing_reason() -> str | None:
    """Why the corpus is unavailable (``gensim`` not installed), or None.

    Example:
      >>> from examples.smollm.corpus import missing_reason
      >>> missing_reason() is None or 'gensim' in missing_reason()
      True
    """
    if importlib.util.find_spec(CORPUS_PACKAGE) is None:
        return (f"package 'gensim' (its test data has the Wikipedia sample) is not installed; "
                f"install with: {INSTALL_HINT}")
    return None


def available() -> bool:
    """True when the wheel with the Wikipedia sample is installed.

    Example:
      >>> from examples.smollm.corpus import available
      >>> isinstance(available(), bool)
      True
    """
    return missing_reason() is None


def corpus_path() -> pathlib.Path:
    """Path of the bz2 XML dump inside the installed ``gensim`` package (found without importing it).

    Example:
      >>> from examples.smollm.corpus import available, corpus_path
      >>> corpus_path().name.startswith('enwiki') if available() else True
      True
    """
    reason = missing_reason()
    if reason:
        raise ImportError(f"SmolLM2 corpus: {reason}")
    spec = importlib.util.find_spec(CORPUS_PACKAGE)
    for folder in spec.submodule_search_locations or []:
        path = pathlib.Path(folder) / CORPUS_FILE
        if path.exists():
            return path
    raise FileNotFoundError(f"SmolLM2 corpus: {CORPUS_FILE} is not in the installed gensim; reinstall with: "
                            f"{INSTALL_HINT}")


def _remove_nested(text: str, pattern: re.Pattern[str]) -> str:
    while True:  # innermost first, until nothing matches
        new = pattern.sub('', text)
        if new == text:
            return text
        text = new


_TEMPLATE = re.compile(r'\{\{[^{}]*\}\}')
_TABLE = re.compile(r'\{\|(?:(?!\{\|)[\s\S])*?\|\}')
_INNER_LINK = re.compile(r'\[\[([^\[\]]*)\]\]')
_EXT_LINK = re.compile(r'\[(?:https?:)?//[^\s\]]+(?:\s+([^\]]*))?\]')
_HEADING = re.compile(r'^(=+)\s*(.*?)\s*\1\s*$')


def _link(match: re.Match[str]) -> str:
    body = match.group(1)
    target, _, label = body.partition('|')
    if target.strip().lower().startswith(_DROP_LINK_PREFIXES) or re.match(r'^[a-z]{2,3}(-[a-z]+)?:', target):
        return ''  # files, categories, interwiki links
    if '|' in label:  # [[File:x|thumb|caption]] leftovers
        label = label.rsplit('|', 1)[-1]
    return label or target


def strip_wikitext(text: str, min_words: int = 0) -> str:
    """Plain paragraphs (joined by blank lines) of one article's wikitext; see the module docstring.

    Paragraphs of fewer than ``min_words`` words are dropped (:func:`articles`
    uses :data:`MIN_PARAGRAPH_WORDS`).

    Example:
      >>> from examples.smollm.corpus import strip_wikitext
      >>> strip_wikitext("Intro text here.\\n\\n== History ==\\nMore [[text]].\\n== See also ==\\n* [[Other]]")
      'Intro text here.\\n\\nMore text.'
    """
    text = html.unescape(text).replace('\xa0', ' ')
    text = re.sub(r'<!--[\s\S]*?-->', '', text)
    text = re.sub(r'<ref[^>]*/>', '', text)
    text = re.sub(r'<ref[^>]*>[\s\S]*?</ref>', '', text)
    text = re.sub(r'<(math|gallery|timeline|syntaxhighlight|source|pre|code|score|imagemap)[^>]*>[\s\S]*?</\1>',
                  '', text)
    text = _remove_nested(text, _TEMPLATE)
    text = _remove_nested(text, _TABLE)
    while True:
        new = _INNER_LINK.sub(_link, text)
        if new == text:
            break
        text = new
    text = _EXT_LINK.sub(lambda m: m.group(1) or '', text)
    text = re.sub(r"'{2,}", '', text)
    text = re.sub(r'<[^>]+>', '', text)
    text = re.sub(r'__[A-Z]+__', '', text)
    paragraphs, current = [], []
    for line in text.split('\n'):
        heading = _HEADING.match(line.strip())
        if heading:
            if heading.group(2).strip().lower() in _STOP_SECTIONS:
                break
            line = ''
        if not line.strip() or line.lstrip()[:1] in ('*', '#', ':', ';', '|', '!', '{', '}'):
            if current:
                paragraphs.append(' '.join(current))
                current = []
            continue
        current.append(line.strip())
    if current:
        paragraphs.append(' '.join(current))
    out = []
    for p in paragraphs:
        p = re.sub(r'\(\s*[;,]?\s*\)', '', p)  # "( )" left by removed pronunciations
        p = re.sub(r'\s+([,.;:])', r'\1', re.sub(r'\s{2,}', ' ', p)).strip()
        if p and len(p.split()) >= min_words:
            out.append(p)
    return '\n\n'.join(out)


@functools.lru_cache(maxsize=2)
def _articles(path: str) -> tuple[tuple[str, str], ...]:
    out = []
    with bz2.open(path, 'rb') as f:
        for _, elem in ET.iterparse(f, events=('end',)):
            if not elem.tag.endswith('}page'):
                continue
            ns_ = elem.tag[:-len('page')]
            title = elem.findtext(ns_ + 'title') or ''
            text = elem.findtext(f'{ns_}revision/{ns_}text') or ''
            if elem.findtext(ns_ + 'ns') == '0' and elem.find(ns_ + 'redirect') is None:
                body = strip_wikitext(text, MIN_PARAGRAPH_WORDS)
                if body:
                    out.append((title, body))
            elem.clear()
    return tuple(out)


def articles(path: str | pathlib.Path | None = None) -> list[tuple[str, str]]:
    """``[(title, plain text)]`` for the dump's articles, in file order (redirects and empty pages skipped).

    Example:
      >>> from examples.smollm.corpus import articles, available
      >>> arts = articles() if available() else [('Anarchism', 'Anarchism is a political philosophy ...')]
      >>> arts[0][0]
      'Anarchism'
    """
    return list(_articles(str(path or corpus_path())))


def token_windows(tokenizer: Any, window: int, count: int, start: int = 0,
                  path: str | pathlib.Path | None = None) -> np.ndarray:
    """``(count, window)`` int32 token ids: the first ``window`` tokens of ``count`` articles, from the ``start``-th on.

    Only articles with at least ``window`` tokens count (``start`` indexes those),
    so windows are full and each comes from a different article. ``tokenizer``
    needs an ``encode(text) -> list[int]`` method.

    Example:
      >>> import numpy as np
      >>> from examples.smollm.corpus import available, token_windows
      >>> class Chars:  # a stand-in tokenizer: one id per character
      ...     def encode(self, s): return [ord(c) % 256 for c in s]
      >>> w = token_windows(Chars(), window=32, count=2) if available() else np.zeros((2, 32), np.int32)
      >>> w.shape, w.dtype
      ((2, 32), dtype('int32'))
    """
    if window < 2 or count < 1 or start < 0:
        raise ValueError(f"need window >= 2, count >= 1, start >= 0; got {window}, {count}, {start}")
    rows, seen = [], 0
    for _, text in articles(path):
        ids = tokenizer.encode(text[:window * 16])  # a token is rarely over 16 characters: enough text, fast
        if len(ids) < window:
            continue
        if seen >= start:
            rows.append(ids[:window])
            if len(rows) == count:
                return np.asarray(rows, np.int32)
        seen += 1
    raise ValueError(f"the corpus has only {seen} articles of >= {window} tokens; asked for {start} + {count}")



def calibration_windows(tokenizer: Any, window: int, count: int, skip: int,
                        path: str | pathlib.Path | None = None) -> np.ndarray:
    """``(count, window)`` token ids for calibration, disjoint from :func:`token_windows` ``(window, skip)``.

    The articles after the first ``skip`` that :func:`token_windows` would use
    (those with at least ``window`` tokens) are cut into consecutive
    ``window``-token pieces (several per long article: far more text than one
    window each), and ``count`` of them are taken evenly spread over all, so
    the set does not lean on the first articles.

    Example:
      >>> import numpy as np
      >>> from examples.smollm.corpus import available, calibration_windows
      >>> class Chars:  # a stand-in tokenizer: one id per character
      ...     def encode(self, s): return [ord(c) % 256 for c in s]
      >>> w = calibration_windows(Chars(), 32, 4, skip=2) if available() else np.zeros((4, 32), np.int32)
      >>> w.shape
      (4, 32)
    """
    if window < 2 or count < 1 or skip < 0:
        raise ValueError(f"need window >= 2, count >= 1, skip >= 0; got {window}, {count}, {skip}")
    pieces, seen = [], 0
    for _, text in articles(path):
        ids = tokenizer.encode(text)
        if len(ids) < window:
            continue
        seen += 1
        if seen > skip:
            pieces += [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)]
    if len(pieces) < count:
        raise ValueError(f"the corpus has only {len(pieces)} {window}-token pieces after {skip} articles; "
                         f"asked for {count}")
    picks = np.linspace(0, len(pieces) - 1, count).round().astype(int)
    return np.asarray([pieces[i] for i in picks], np.int32)
