/// Finds the line on which each key of a TOML document is defined.
///
/// TOMLKit reports line and column for syntax errors, but the values it hands back carry no
/// position, so an error found while *validating* a value ("expected a boolean") could not
/// say where it is. This scanner reads the same source text and records, for every key path,
/// the 1-based line of its first definition:
///
/// - table headers `[a.b]` (and their implicit parents `a`),
/// - array-of-tables headers `[[slots]]`, numbered in order: `slots[0]`, `slots[1]`, … — nested
///   ones under the latest element of their parent, like TOML itself (`slots[1].blobs[0]`),
/// - `key = value` lines, dotted keys (`a.b = 1`) and quoted keys (`"my board" = 1`),
/// - keys inside inline tables and elements of arrays (`image = { file = "x" }` gives
///   `image.file`; `users = [{ name = "a" }]` gives `users[0].name`), even across lines.
///
/// Multi-line strings and arrays are skipped as values, so text inside them that looks like
/// a header or a key is never mistaken for one.
///
/// Key paths are written with `.` between keys and `[n]` for array elements; a key that is not
/// a bare key is quoted: `profiles."my board".image`. The scanner is tolerant: on text that is
/// not valid TOML it records what it can and never fails.
public struct TOMLKeyLocator: Sendable {
    /// One step of a key path.
    public enum Segment: Hashable, Sendable, CustomStringConvertible {
        case key(String)
        case index(Int)

        public var description: String {
            switch self {
            case .key(let key): return TOMLKeyLocator.isBareKey(key) ? key : "\"\(key)\""
            case .index(let index): return "[\(index)]"
            }
        }
    }

    private var lines: [[Segment]: Int]

    /// Scans `source` (the text of a TOML document).
    public init(source: String) {
        var scanner = Scanner(bytes: Array(source.utf8))
        scanner.scanDocument()
        lines = scanner.lines
    }

    /// The line where `path` (e.g. `profiles.demo.image`, `slots[2].match`) is defined, or nil.
    public func line(of path: String) -> Int? {
        lines[Self.segments(of: path)]
    }

    /// The line where `path` is defined, or nil.
    public func line(of path: [Segment]) -> Int? {
        lines[path]
    }

    /// The line of `path` or, when it is not in the document (a missing key), of its closest
    /// enclosing table that is: the place a person would add the key.
    public func nearestLine(of path: String) -> Int? {
        nearestLine(of: Self.segments(of: path))
    }

    /// The line of `path` or of its closest located ancestor.
    public func nearestLine(of path: [Segment]) -> Int? {
        var path = path
        while !path.isEmpty {
            if let line = lines[path] { return line }
            path.removeLast()
        }
        return nil
    }

    /// Every located key path with its line, sorted by line (for diagnostics and tests).
    public var locatedPaths: [(path: String, line: Int)] {
        lines.map { (Self.format($0.key), $0.value) }.sorted { ($0.line, $0.path) < ($1.line, $1.path) }
    }

    /// Splits a written key path into segments: `a."b.c"[3].d` → key a, key b.c, index 3, key d.
    public static func segments(of path: String) -> [Segment] {
        var result: [Segment] = []
        var scanner = Scanner(bytes: Array(path.utf8))
        while !scanner.atEnd {
            let byte = scanner.peek()
            if byte == UInt8(ascii: ".") {
                scanner.position += 1
            } else if byte == UInt8(ascii: "[") {
                scanner.position += 1
                var digits = ""
                while !scanner.atEnd, scanner.peek() != UInt8(ascii: "]") {
                    digits.append(Character(UnicodeScalar(scanner.peek())))
                    scanner.position += 1
                }
                scanner.position += 1
                result.append(.index(Int(digits) ?? -1))
            } else {
                result.append(.key(scanner.scanSimpleKey() ?? ""))
                if scanner.position < scanner.bytes.count, scanner.peek() != UInt8(ascii: "."),
                   scanner.peek() != UInt8(ascii: "[") {
                    scanner.position += 1  // stray character: skip rather than loop forever
                }
            }
        }
        return result
    }

    /// Writes segments as a key path string, the inverse of `segments(of:)`.
    public static func format(_ segments: [Segment]) -> String {
        var text = ""
        for segment in segments {
            if case .key = segment, !text.isEmpty { text += "." }
            text += segment.description
        }
        return text
    }

    /// Whether `key` can be written without quotes (TOML's bare keys: A–Z a–z 0–9 _ -).
    public static func isBareKey(_ key: String) -> Bool {
        !key.isEmpty && key.utf8.allSatisfy(Scanner.isBareKeyByte)
    }
}

extension TOMLKeyLocator {
    /// A byte cursor over the document that knows the current line.
    fileprivate struct Scanner {
        let bytes: [UInt8]
        var position = 0
        var line = 1
        var lines: [[Segment]: Int] = [:]
        var currentTable: [Segment] = []
        /// How many elements each array of tables has so far, keyed by its resolved path.
        var arrayTableCounts: [[Segment]: Int] = [:]

        init(bytes: [UInt8]) { self.bytes = bytes }

        var atEnd: Bool { position >= bytes.count }
        func peek(_ offset: Int = 0) -> UInt8 {
            position + offset < bytes.count ? bytes[position + offset] : 0
        }

        static func isBareKeyByte(_ byte: UInt8) -> Bool {
            (byte >= 0x41 && byte <= 0x5A) || (byte >= 0x61 && byte <= 0x7A)
                || (byte >= 0x30 && byte <= 0x39) || byte == 0x5F || byte == 0x2D
        }

        mutating func advance() {
            if bytes[position] == 0x0A { line += 1 }
            position += 1
        }

        mutating func record(_ path: [Segment], line: Int) {
            if lines[path] == nil { lines[path] = line }
        }

        /// Records `path` and every ancestor not yet seen (implicitly defined tables).
        mutating func recordWithParents(_ path: [Segment], line: Int) {
            for length in 1...max(path.count, 1) where length <= path.count {
                record(Array(path.prefix(length)), line: line)
            }
        }

        mutating func skipSpaces() {
            while !atEnd, peek() == 0x20 || peek() == 0x09 { position += 1 }
        }

        mutating func skipToEndOfLine() {
            while !atEnd, peek() != 0x0A { position += 1 }
        }

        /// Skips spaces, newlines and comments (inside arrays and inline tables).
        mutating func skipTrivia() {
            while !atEnd {
                switch peek() {
                case 0x20, 0x09, 0x0D, 0x0A: advance()
                case UInt8(ascii: "#"): skipToEndOfLine()
                default: return
                }
            }
        }

        mutating func scanDocument() {
            while !atEnd {
                skipTrivia()
                if atEnd { break }
                let startLine = line
                if peek() == UInt8(ascii: "[") {
                    scanHeader(startLine: startLine)
                } else if let keys = scanDottedKey() {
                    skipSpaces()
                    let path = currentTable + keys
                    recordWithParents(path, line: startLine)
                    if peek() == UInt8(ascii: "=") {
                        position += 1
                        skipSpaces()
                        scanValue(path)
                    }
                }
                // Whatever is left on the line (a comment, or text that is not TOML).
                skipToEndOfLine()
            }
        }

        mutating func scanHeader(startLine: Int) {
            let isArray = peek(1) == UInt8(ascii: "[")
            position += isArray ? 2 : 1
            skipSpaces()
            guard let keys = scanDottedKey(), !keys.isEmpty else { return }
            // Resolve through arrays of tables: `[slots.match]` after `[[slots]]` means the
            // latest slot, so the path is `slots[n].match`.
            var resolved: [Segment] = []
            for (offset, key) in keys.enumerated() {
                resolved.append(key)
                let isLast = offset == keys.count - 1
                if isLast && isArray {
                    let index = arrayTableCounts[resolved, default: 0]
                    arrayTableCounts[resolved] = index + 1
                    record(resolved, line: startLine)
                    resolved.append(.index(index))
                } else if let count = arrayTableCounts[resolved] {
                    resolved.append(.index(count - 1))
                }
                record(resolved, line: startLine)
            }
            currentTable = resolved
        }

        /// A key such as `a`, `"a b"`, `'c'` or `a . "b" . c`; nil if none starts here.
        mutating func scanDottedKey() -> [Segment]? {
            var keys: [Segment] = []
            while true {
                skipSpaces()
                guard let key = scanSimpleKey() else { return keys.isEmpty ? nil : keys }
                keys.append(.key(key))
                skipSpaces()
                guard peek() == UInt8(ascii: ".") else { return keys }
                position += 1
            }
        }

        mutating func scanSimpleKey() -> String? {
            guard !atEnd else { return nil }
            let byte = peek()
            if byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "'") {
                return scanSingleLineString(quote: byte)
            }
            let start = position
            while !atEnd, Self.isBareKeyByte(peek()) { position += 1 }
            guard position > start else { return nil }
            return String(decoding: bytes[start..<position], as: UTF8.self)
        }

        /// A one-line string, returned with its simple escapes resolved (keys only need that).
        mutating func scanSingleLineString(quote: UInt8) -> String {
            position += 1
            var text: [UInt8] = []
            while !atEnd, peek() != quote, peek() != 0x0A {
                if quote == UInt8(ascii: "\""), peek() == UInt8(ascii: "\\"), position + 1 < bytes.count {
                    position += 1
                    let escaped = peek()
                    switch escaped {
                    case UInt8(ascii: "n"): text.append(0x0A)
                    case UInt8(ascii: "t"): text.append(0x09)
                    default: text.append(escaped)
                    }
                    position += 1
                    continue
                }
                text.append(peek())
                position += 1
            }
            if !atEnd, peek() == quote { position += 1 }
            return String(decoding: text, as: UTF8.self)
        }

        /// Skips one value, recording the keys inside inline tables and arrays under `path`.
        mutating func scanValue(_ path: [Segment]) {
            guard !atEnd else { return }
            switch peek() {
            case UInt8(ascii: "\""), UInt8(ascii: "'"):
                scanStringValue()
            case UInt8(ascii: "["):
                position += 1
                var index = 0
                while true {
                    skipTrivia()
                    if atEnd { return }
                    if peek() == UInt8(ascii: "]") { position += 1; return }
                    if peek() == UInt8(ascii: ",") { position += 1; index += 1; continue }
                    let before = position
                    record(path + [.index(index)], line: line)
                    scanValue(path + [.index(index)])
                    if position == before { position += 1 }
                }
            case UInt8(ascii: "{"):
                position += 1
                while true {
                    skipTrivia()
                    if atEnd { return }
                    if peek() == UInt8(ascii: "}") { position += 1; return }
                    if peek() == UInt8(ascii: ",") { position += 1; continue }
                    let keyLine = line
                    guard let keys = scanDottedKey() else { position += 1; continue }
                    recordWithParents(path + keys, line: keyLine)
                    skipSpaces()
                    if peek() == UInt8(ascii: "=") {
                        position += 1
                        skipSpaces()
                        scanValue(path + keys)
                    }
                }
            default:
                // Numbers, booleans, dates: up to the next delimiter.
                while !atEnd {
                    let byte = peek()
                    if byte == UInt8(ascii: ",") || byte == UInt8(ascii: "]") || byte == UInt8(ascii: "}")
                        || byte == UInt8(ascii: "#") || byte == 0x0A { return }
                    position += 1
                }
            }
        }

        mutating func scanStringValue() {
            let quote = peek()
            if peek(1) == quote, peek(2) == quote {
                // Multi-line string: ends at the first unescaped triple quote (plus up to two
                // more quotes that belong to the content, as TOML allows).
                position += 3
                while !atEnd {
                    if quote == UInt8(ascii: "\""), peek() == UInt8(ascii: "\\") {
                        advance()
                        if !atEnd { advance() }
                        continue
                    }
                    if peek() == quote, peek(1) == quote, peek(2) == quote {
                        position += 3
                        while !atEnd, peek() == quote { position += 1 }
                        return
                    }
                    advance()
                }
            } else {
                _ = scanSingleLineString(quote: quote)
            }
        }
    }
}
