"""tftp-hpa compatible filename remapping (tftpd/remap.py).

Every expected result in CROSS_CHECKED was also produced by tftp-hpa 5.2's own
remap.c (rewrite_string() and friends, plus tftpd.c's rewrite_macros()) built
standalone with gcc and glibc's regcomp/regexec in a small harness, fed the same
rule text and requests: all of them agree.  The few tests outside that table
cover cases where 5.2 hangs or has undefined behaviour (noted at each test) or
options that 5.2 does not have.
"""

from __future__ import annotations

import os

import pytest
from conftest import scaled
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tftpd.remap import MAX_STEPS, TABLE_FAILURE, Outcome, RemapError, Rules

IP = "192.0.2.169"
IP6 = "2001:db8::1"

# tftp-hpa's example map file, verbatim (tftpd/sample.rules in the tftp-hpa
# sources; the man page itself has no example file).
SAMPLE_RULES = r"""#
# Sample rule file for the -m (remapping option)
#
# This file has three fields: operation, regex, remapping
#
# The operation is a combination of the following letters:
#
# r - rewrite the matched string with the remapping pattern
# i - case-insensitive matching
# g - repeat until no match (used with "r")
# e - exit (with success) if we match this pattern, do not process
#     subsequent rules
# s - start over from the first rule if we match this pattern
# a - abort (refuse the request) if we match this rule
# G - this rule applies to TFTP GET requests only
# P - this rule applies to TFTP PUT requests only
#
# The regex is a regular expression in the style of egrep(1).
#
# The remapping is a pattern, all characters are verbatim except \
# \0 copies the full string that matched the regex
# \1..\9 copies the 9 first (..) expressions in the regex
# \\ is an escaped \
#
# "#" begins a comment, unless \-escaped
#
ri	^[a-z]:				# Remove "drive letters"
rg	\\		/		# Convert backslashes to slashes
rg	\#		@		# Convert hash marks to @ signs
rg	/../		/..no../	# Convert /../ to /..no../
e	^ok/				# These are always ok
r	^[^/]		/var/lib/tftpboot/\0	# Convert non-absolute files
a	\.pvt$				# Reject requests for private files
"""

# (rules, filename, client ip, is_write, expected Outcome as (filename, message))
Case = tuple[str, str, str, bool, tuple[str | None, str | None]]
CROSS_CHECKED: list[Case] = [
    # The sample file.
    (SAMPLE_RULES, "C:\\foo\\bar#1", IP, False, ("/foo/bar@1", None)),
    (SAMPLE_RULES, "d:\\Boot\\BCD", IP, False, ("/Boot/BCD", None)),
    (SAMPLE_RULES, "pxelinux.0", IP, False, ("/var/lib/tftpboot/pxelinux.0", None)),
    (SAMPLE_RULES, "ok/../x", IP, False, ("ok/..no../x", None)),
    (SAMPLE_RULES, "/x/ab/cd/", IP, False, ("/x/..no../..no../", None)),
    (SAMPLE_RULES, "a/b/c.pvt", IP, False, (None, None)),
    (SAMPLE_RULES, "ok/a.pvt", IP, False, ("ok/a.pvt", None)),  # e ends before the a rule
    (SAMPLE_RULES, "OK/a.pvt", IP, False, (None, None)),
    (SAMPLE_RULES, "/abs/a#b", IP, True, ("/abs/a@b", None)),
    (SAMPLE_RULES, "\\\\srv\\share", IP, False, ("//srv/share", None)),
    (SAMPLE_RULES, "a b", IP, False, ("/var/lib/tftpboot/a b", None)),
    (SAMPLE_RULES, "", IP, False, ("", None)),
    # Per-client roots: \i and \x.
    ("r ^ \\i/\n", "pxelinux.cfg/default", IP, False, ("192.0.2.169/pxelinux.cfg/default", None)),
    ("r ^ \\i/\n", "x", IP6, False, ("2001:db8::1/x", None)),
    ("r ^ \\i/\n", "x", "::ffff:10.1.2.3", False, ("::ffff:10.1.2.3/x", None)),
    ("r ^ \\x/\nrg \\. _\n", "f.bin", IP, False, ("C00002A9/f_bin", None)),
    ("r ^ \\x/\nrg \\. _\n", "f.bin", IP6, False,
     ("20010DB8000000000000000000000001/f_bin", None)),
    ("r ^ \\U\\x\\L\\x\\E\\i\n", "f", IP, False, ("C00002A9c00002a9192.0.2.169f", None)),
    # r: only the matched part is replaced; an empty replacement deletes it.
    ("r ^/tftpboot/\n", "/tftpboot/pxelinux.0", IP, False, ("pxelinux.0", None)),
    ("r ^/tftpboot/\n", "/x/tftpboot/y", IP, False, ("/x/tftpboot/y", None)),
    ("r [[:digit:]]+ #\n", "abc123def45", IP, False, ("abcdef45", None)),  # "#": a comment
    ("r ^pxelinux\\.cfg/01-(([0-9a-f]{2}-){5}[0-9a-f]{2})$ macs/\\1\n",
     "pxelinux.cfg/01-00-11-22-aa-bb-cc", IP, False, ("macs/00-11-22-aa-bb-cc", None)),
    ("r ^(.*)\\.(bin|img)$ \\1.img\n", "x.img.bin", IP, False, ("x.img.img", None)),
    # g: repeat, searching the whole new string from the start each time.
    ("rg a b\n", "aaa", IP, False, ("bbb", None)),
    ("r a b\n", "aaa", IP, False, ("baa", None)),
    ("r ^/?(.*)$ /\\1\nrg //+ /\n", "a//b///c", IP, False, ("/a/b/c", None)),
    ("g a\n", "a", IP, False, ("a", None)),  # g without r is ignored
    # i
    ("ri ^abc XYZ\n", "ABCdef", IP, False, ("XYZdef", None)),
    ("r ^abc XYZ\n", "ABCdef", IP, False, ("ABCdef", None)),
    ("rgi [[:upper:]] 1\n", "AbC", IP, False, ("111", None)),
    ("rgi A b\n", "AaÄä", IP, False, ("bbÄä", None)),  # ASCII only, like the C locale
    # e
    ("r a b\ne b stop\nr b c\n", "a", IP, False, ("b", None)),
    ("r a b\ne b stop\nr b c\n", "x", IP, False, ("x", None)),
    ("e~ \\.cfg$\nr ^ cfg/\n", "a.cfg", IP, False, ("cfg/a.cfg", None)),
    ("e~ \\.cfg$\nr ^ cfg/\n", "a.bin", IP, False, ("a.bin", None)),
    # s: 5.2 resumes at the *second* rule (see test_restart_can_include_first_rule).
    ("rs ^a b\nr ^b c\n", "a", IP, False, ("c", None)),
    ("r ^x done\nrs ^a b\nr ^b c\n", "a", IP, False, ("c", None)),
    ("rs a b\n", "aaa", IP, False, ("baa", None)),
    ("s ^a\n", "a", IP, False, ("a", None)),
    ("r ^zzz q\ns ^a\n", "abc", IP, False, (None, TABLE_FAILURE)),  # the deadman
    ("r ^zzz q\ns ^a\n", "xbc", IP, False, ("xbc", None)),
    # a, with and without a message; the message keeps the text around the match.
    ("a \\.\\./\n", "../etc/passwd", IP, False, (None, None)),
    ("a \\.\\./\n", "ok", IP, False, ("ok", None)),
    ("a secret Denied:\\0\n", "top/secret/x", IP, False, (None, "top/Denied:secret/x")),
    ("a~ ^/srv/\n", "/etc/x", IP, False, (None, None)),
    ("a~ ^/srv/\n", "/srv/x", IP, False, ("/srv/x", None)),
    # G, P, 4, 6 (and their combinations: the last of G/P wins, 46 never applies).
    *[(r"rG ^ get/" "\nrP ^ put/\nrGP ^ gp/\nr4 ^ v4/\nr6 ^ v6/\nr46 ^ both/\n",
       "f", ip, write, (want, None)) for ip, write, want in [
           (IP, False, "v4/get/f"), (IP, True, "v4/gp/put/f"),
           (IP6, False, "v6/get/f"), ("::1", True, "v6/gp/put/f")]],
    # Replacement escapes.
    ("r ^(.*)\\.([^.]*)$ \\U\\2\\E.\\1\\Lx\\iY\n", "Name.txt", IP, False,
     ("TXT.Namex192.0.2.169y", None)),
    ("r ^(.)(.)(.)(.)(.)(.)(.)(.)(.)(.) \\9\\8\\7\\6\\5\\4\\3\\2\\1\\0\n", "abcdefghijk", IP,
     False, ("ihgfedcbaabcdefghijk", None)),
    ("r (x)? [\\1]\n", "y", IP, False, ("[]y", None)),  # unset group: empty
    ("r (a)(b)? [\\1\\2\\3]\n", "ac", IP, False, ("[a]c", None)),  # \3 > groups: empty
    ("r a \\q\\\\\\#\\ z\\\nr b B\n", "cab", IP, False, ("cq\\# z\nB", None)),
    ("r a \\Ué\\E\n", "a", IP, False, ("é", None)),
    # Fields: escaped blanks and hashes, comments, blank lines, extra fields.
    ("r a\\ b X\nr c\\#d Y\nr e\\\\f Z\n", "a bc#de\\f", IP, False, ("XYZ", None)),
    ("r x y # comment \\1\nr y#z w\n", "xyz", IP, False, ("yz", None)),  # regex y, no repl.
    ("   # only a comment\n\n\t\nr a b  \n", "aaa", IP, False, ("baa", None)),
    ("r a b extra fields\n", "a", IP, False, ("b", None)),
    ("r a\\\nr b c\\\n", "xab", IP, False, ("xac\n", None)),  # "\" escapes the newline
    ("r\ta\tb\r\n", "a", IP, False, ("b", None)),  # CRLF files
    # POSIX EREs: classes, brackets, intervals, back-references, longest match.
    ("r [[:digit:]]+ N\nrg [[:lower:]] A\nrg [[:space:]] _\nrg [[:punct:]] 9\n",
     "ab12 c!d\t", IP, False, ("AAN9A9A9", None)),  # "_" is punctuation too
    ("rg [[:upper:]] u\n", "AbC", IP, False, ("ubu", None)),
    ("rg [[:alnum:]] .\nrg [[:xdigit:]] x\n", "a-G", IP, False, (".-.", None)),
    ("rg [[:blank:][:cntrl:]] _\n", "a b\tc\x01", IP, False, ("a_b_c_", None)),
    ("r [a-] X\nr []] Y\nr [^]a] Z\n", "-]a", IP, False, ("ZYa", None)),
    ("r [\\] X\n", "a\\b", IP, False, ("aXb", None)),  # no escapes inside brackets
    ("rg [.a.]-[=b=] x\n", "ab", IP, False, ("ab", None)),
    ("r a{2,3} X\nr b{,2} Y\nr c{2} Z\n", "aaaabbbccc", IP, False, ("YXabbbZc", None)),
    ("r a** X\n", "aaab", IP, False, ("Xb", None)),
    ("r a+? X\n", "aaab", IP, False, ("Xb", None)),  # not Python's lazy/possessive
    ("r ) X\n", "a)b", IP, False, ("aXb", None)),
    ("r (a)\\1 B\n", "xaay", IP, False, ("xBy", None)),
    ("r \\w+ W\nrg \\s _\n", "ab_1-c d", IP, False, ("W-c_d", None)),
    ("r \\<b X\n", "ab b", IP, False, ("ab X", None)),
    ("r \\d D\nr \\n N\n", "d1n", IP, False, ("D1N", None)),  # escaped letters are literal
    ("r .$ E\n", "ab\x7f", IP, False, ("abE", None)),
    ("r ^..$ TWO\n", "é", IP, False, ("TWO", None)),  # bytes, as in C: é is 2 of them
    ("r (a|ab)(c|bcd)(d*) <\\0>\n", "xabcdx", IP, False, ("x<abcd>x", None)),
    ("r (a|ab)c? <\\0>\n", "zabcz", IP, False, ("z<abc>z", None)),
    ("r (a*)(ab)*(b*) <\\0>\n", "xaababbb", IP, False, ("<>xaababbb", None)),  # leftmost
    ("r (a*)(ab)*(b*) <\\0>\n", "aababbb", IP, False, ("<aababbb>", None)),  # then longest
    ("r x*(y|yz)? <\\0>\n", "xxyzq", IP, False, ("<xxyz>q", None)),
    ("r ^(.*)(bin|binary)$ <\\1|\\2>\n", "abinary", IP, False, ("<a|binary>", None)),
]


@pytest.mark.parametrize("rules,name,ip,write,want", CROSS_CHECKED)
def test_cross_checked_against_tftp_hpa(rules: str, name: str, ip: str, write: bool,
                                        want: tuple[str | None, str | None]) -> None:
    got = Rules.parse(rules).evaluate(name, ip, write)
    assert got == Outcome(*want)
    assert Rules.parse(rules).apply(name, ip, write) == want[0]


def test_sample_file_loads_from_disk(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "map")
    with open(path, "w") as f:
        f.write(SAMPLE_RULES)
    rules = Rules.load(path)
    assert len(rules) == 7
    assert rules.apply("C:\\pxelinux.0", IP, False) == "/pxelinux.0"
    assert rules.apply("pxelinux.0", IP, False) == "/var/lib/tftpboot/pxelinux.0"


def test_undecodable_names_round_trip() -> None:
    name = os.fsdecode(b"dir\\caf\xe9\xff.bin")  # not UTF-8: surrogate escapes
    rules = Rules.parse("rg \\\\ /\nr ^ \\i/\n")
    assert os.fsencode(rules.apply(name, IP, False)) == b"192.0.2.169/dir/caf\xe9\xff.bin"
    # '.' is one byte, as in C: it takes half of the é.
    assert Rules.parse("r ^dir/.{3}(.) <\\1>\n").apply("dir/café", IP, False) == \
        os.fsdecode(b"<\xc3>\xa9")


def test_restart_can_include_first_rule() -> None:
    text = "r ^ \\i/\nrs \\.\\./ /\n"
    assert Rules.parse(text).apply("a/../b", IP, False) == "192.0.2.169/a//b"
    fixed = Rules.parse(text, restart_skips_first_rule=False)
    assert fixed.apply("a/../b", IP, False) == "192.0.2.169/192.0.2.169/a//b"
    assert Rules.parse("rs a b\n", restart_skips_first_rule=False).apply("aaa", IP, False) == "bbb"


@pytest.mark.parametrize("rules", ["rg a aa\n", "rg ^ x\n", "rg x* y\n", "rgi [[:upper:]] u\n"])
def test_global_rules_that_never_stop_are_refused(rules: str) -> None:
    # tftp-hpa 5.2 loops forever on these (cross-checked: the harness hangs).
    assert Rules.parse(rules).evaluate("aAx", IP, False) == Outcome(None, TABLE_FAILURE)


def test_step_limit() -> None:
    assert MAX_STEPS == 1024
    # 5.2 counts rule evaluations: "s ^a" re-runs itself until the deadman fires.
    looping = Rules.parse("r ^zzz q\ns ^a\n")
    assert looping.evaluate("a", IP, False) == Outcome(None, TABLE_FAILURE)
    chain = "".join(f"r ^{i}$ {i + 1}\n" for i in range(10))
    assert Rules.parse(chain).apply("0", IP, False) == "10"
    assert Rules.parse(chain, max_steps=5).apply("0", IP, False) is None


def test_inverse_abort_message_is_the_replacement() -> None:
    # 5.2 runs memcpy() with length -1 here (undefined behaviour).
    rules = Rules.parse("r ^ X\na~ ^/srv/ nope:\\0\\1\\i\n")
    assert rules.evaluate("/srv/x", IP, False) == Outcome(None, "nope:192.0.2.169")


def test_unparsable_client_address() -> None:
    rules = Rules.parse("r4 ^ 4\nr6 ^ 6\nr ^ <\\i|\\x>\n")
    assert rules.apply("f", "not-an-ip", False) == "<not-an-ip|>f"
    assert rules.apply("f", "fe80::1%eth0", False) == "<fe80::1|FE800000000000000000000000000001>6f"


BAD = """\
r a b
q a b
r [ x
r~ a b
r
r a( x
r a\\
* x y
r * x
r (*) x
r a|*b x
r ^* x
r a{ x
r a{x} x
r a{3,2} x
r [z-a] x
r [[:foo:]] x
r \\1(a) x
r {1} x
r a{1 x
r () x
r a|| x
r $* x
r a\\"""


def test_parse_errors_name_every_bad_line() -> None:
    # The same lines glibc's regcomp / 5.2's parser reject (cross-checked).
    with pytest.raises(RemapError) as info:
        Rules.parse(BAD, "tftpd.map")
    lines = [line for _, line, _ in info.value.errors]
    assert lines == [2, 3, 4, 5, 6, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 23, 24]
    msg = str(info.value).splitlines()
    assert msg[0] == 'tftpd.map:2: invalid flag "q" in "q"'
    assert msg[2] == "tftpd.map:4: r rules cannot be inverted (~)"
    assert msg[3] == "tftpd.map:5: no regex"
    assert msg[-1] == "tftpd.map:24: trailing backslash"
    assert isinstance(info.value, ValueError)


def test_load_reports_the_path(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(tmp_path, "bad.map")
    with open(path, "wb") as f:
        f.write(b"# ok\nr ok ok\nrx [[:nope:]] y\n")
    with pytest.raises(RemapError, match=r"bad\.map:3: invalid flag"):
        Rules.load(path)


def test_empty_rule_file_changes_nothing() -> None:
    assert Rules.parse("").apply("a\\b", IP, True) == "a\\b"
    assert Rules.parse("# nothing\n\n").apply("x", IP6, False) == "x"


FIXED = Rules.parse(SAMPLE_RULES + "r ^(.*)\\.([^.]*)$ \\U\\2\\E.\\1\\x\\i\nrs ^/x/ /y/\n"
                    "a~ ^/ \\0\nrgi [[:upper:]]+ l\n")
# An s rule that matches and changes nothing loops until the deadman refuses the
# request, except as the first rule: 5.2 restarts at the second one.
NON_REWRITING = Rules.parse("s ^a\ne ^ok\ni B\nG x\nP y\n~ q\n46 z\ng w\n4 .\n6 (a|b)*c\n")
names = st.text(max_size=80) | st.text(alphabet="aAbB/\\.#:-_x0 ", max_size=40)
ips = st.ip_addresses().map(str) | st.text(max_size=20)


# ~30 ms an example (the deadman's backtracking): 30 times as many under deep.
@settings(max_examples=scaled(300, deep=30), deadline=None)
@given(name=names, ip=ips, write=st.booleans())
@example(name="/00./", ip="\u0100", write=False)  # \i put a non-latin-1 "address" in
def test_apply_never_raises(name: str, ip: str, write: bool) -> None:
    got = FIXED.evaluate(os.fsdecode(os.fsencode(name)), ip, write)
    assert got.filename is None or isinstance(got.filename, str)


@settings(max_examples=scaled(300), deadline=None)
@given(name=names, ip=st.ip_addresses().map(str), write=st.booleans())
def test_rules_without_r_or_a_leave_names_alone(name: str, ip: str, write: bool) -> None:
    name = os.fsdecode(os.fsencode(name))
    assert NON_REWRITING.apply(name, ip, write) == name
