/// A colon-separated account file (passwd, shadow, group, gshadow) kept line by line so
/// it renders back byte-identical when nothing changed.
///
/// Comments, blank lines, NIS compat lines (`+`, `-`, `+@netgroup`) and anything else that
/// is not a plain record are kept verbatim, in order. A record keeps all its fields,
/// including fields beyond the documented count, so a later format extension survives
/// a round trip. Splitting on ":" and joining back is exact, which is what makes
/// the untouched lines byte-identical without storing them twice.
public struct ColonSeparatedFile: Sendable, Equatable {
    public enum Line: Sendable, Equatable {
        /// A record split on ":" (all fields, however many).
        case record([String])
        /// A comment, blank line or NIS compat line: kept exactly as read.
        case verbatim(String)
    }

    /// Which file this is, for error messages ("/etc/shadow line 4").
    public let path: String
    public var lines: [Line]
    /// Whether the file ended with "\n" (an empty file counts as ending with one).
    public var endsWithNewline: Bool

    /// Parses `text`; every record must have at least `minimumFields` fields and a
    /// non-empty first field, else the error names the file and line.
    public init(path: String, text: String, minimumFields: Int) throws(AccountsError) {
        self.path = path
        var parts = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        endsWithNewline = text.isEmpty || text.hasSuffix("\n")
        if endsWithNewline { parts.removeLast() }
        var lines: [Line] = []
        lines.reserveCapacity(parts.count)
        for (index, raw) in parts.enumerated() {
            if Self.isVerbatim(raw) {
                lines.append(.verbatim(raw))
                continue
            }
            let fields = raw.split(separator: ":", omittingEmptySubsequences: false).map(String.init)
            guard fields.count >= minimumFields, !fields[0].isEmpty else {
                throw AccountsError(.malformedFile, """
                    \(path) line \(index + 1): expected at least \(minimumFields) colon-separated \
                    fields, found \(fields.count) in "\(Self.redacted(raw))"; fix or remove that line
                    """)
            }
            lines.append(.record(fields))
        }
        self.lines = lines
    }

    /// Comments, blank lines and NIS compat entries are not records we may edit.
    static func isVerbatim(_ line: String) -> Bool {
        guard let first = line.first else { return true }
        return first == "#" || first == "+" || first == "-" || line.allSatisfy(\.isWhitespace)
    }

    /// A malformed shadow line may carry a hash: never echo the second field.
    static func redacted(_ line: String) -> String {
        let fields = line.split(separator: ":", omittingEmptySubsequences: false)
        guard fields.count > 1 else { return String(line.prefix(40)) }
        return fields[0] + ":…"
    }

    public func rendered() -> String {
        var out = ""
        for (index, line) in lines.enumerated() {
            switch line {
            case .record(let fields): out += fields.joined(separator: ":")
            case .verbatim(let raw): out += raw
            }
            if index < lines.count - 1 || endsWithNewline { out += "\n" }
        }
        return out
    }

    /// Index of the record whose first field is `name`.
    public func index(of name: String) -> Int? {
        lines.firstIndex { if case .record(let f) = $0 { f[0] == name } else { false } }
    }

    /// All records with their line indices.
    public var records: [(index: Int, fields: [String])] {
        lines.enumerated().compactMap { i, line in
            if case .record(let f) = line { (i, f) } else { nil }
        }
    }

    /// Replaces the record at `index`, or appends a new one when `index` is nil.
    /// New records go after the last record, so trailing comments stay trailing
    /// and a NIS `+` line that must stay last keeps its place after them.
    public mutating func put(_ fields: [String], at index: Int?) {
        if let index {
            lines[index] = .record(fields)
            return
        }
        if let lastRecord = lines.lastIndex(where: { if case .record = $0 { true } else { false } }) {
            // A NIS compat line (`+` / `-`) at the end must stay at the end: insert before it.
            var position = lastRecord + 1
            if let firstNIS = lines.firstIndex(where: {
                if case .verbatim(let raw) = $0 { raw.hasPrefix("+") || raw.hasPrefix("-") } else { false }
            }), firstNIS > lastRecord {
                position = firstNIS
            }
            lines.insert(.record(fields), at: position)
        } else {
            lines.append(.record(fields))
        }
        endsWithNewline = true
    }

    /// Line number (1-based) for messages.
    public func lineNumber(_ index: Int) -> Int { index + 1 }
}
