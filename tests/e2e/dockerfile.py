"""A small Dockerfile reader for the packaging tests (there is no docker
daemon in CI): instructions with their stage, continuation lines joined,
comments dropped, exec-form (JSON) arguments decoded."""
import json
import shlex


class Instruction:
    def __init__(self, op, args, stage, line):
        self.op = op          # upper case: FROM, RUN, COPY, ...
        self.args = args      # the text after the instruction word
        self.stage = stage    # index of the FROM it belongs to
        self.line = line

    def exec_form(self):
        """The JSON array of an exec-form argument, or None."""
        text = self.args.strip()
        if text.startswith("["):
            try:
                val = json.loads(text)
            except ValueError:
                return None
            return val if isinstance(val, list) else None
        return None

    def words(self):
        return shlex.split(self.args)

    def __repr__(self):
        return "%s %s (line %d)" % (self.op, self.args, self.line)


def parse(path):
    out, stage, buf, start = [], -1, "", 0
    for n, raw in enumerate(open(path).read().splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue   # comments inside a continued instruction
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        op = op.upper()
        if op == "FROM":
            stage += 1
        out.append(Instruction(op, args.strip(), stage, start))
        buf = ""
    assert not buf, "%s: unterminated continuation at line %d" % (path, start)
    return out


def stages(instrs):
    """[(image, name or None)] per FROM."""
    res = []
    for i in instrs:
        if i.op == "FROM":
            w = [x for x in i.words() if not x.startswith("--")]
            name = w[2] if len(w) >= 3 and w[1].upper() == "AS" else None
            res.append((w[0], name))
    return res
