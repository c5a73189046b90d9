import BlockDevices
import TOMLKit

/// Typed, strict access to one table of a `TOMLDocument`: every getter either returns a value
/// of the asked type or throws a `ConfigError` that names the file, line and key path
/// (`expected a boolean, found string "yes"`), and `rejectUnknownKeys` turns typos into errors
/// instead of silently ignored settings.
public struct TOMLTableReader {
    public let table: TOMLTable
    /// Where this table sits in the document, e.g. `profiles.demo` or `slots[2]`.
    public let path: [TOMLKeyLocator.Segment]
    public let document: TOMLDocument

    public init(table: TOMLTable, path: [TOMLKeyLocator.Segment], document: TOMLDocument) {
        self.table = table
        self.path = path
        self.document = document
    }

    /// The key path of `key` in this table.
    public func path(_ key: String) -> [TOMLKeyLocator.Segment] { path + [.key(key)] }

    /// An error about `key` (or about this table when `key` is nil).
    public func error(_ key: String?, _ message: String) -> ConfigError {
        document.error(at: key.map(path) ?? path, message)
    }

    public func contains(_ key: String) -> Bool { table.contains(key: key) }

    /// The raw value; nil when absent.
    public func value(_ key: String) -> TOMLValueConvertible? { table[key] }

    public func string(_ key: String) throws -> String? {
        guard let value = value(key) else { return nil }
        guard let string = value.string else { throw mismatch(key, expected: "a string", found: value) }
        return string
    }

    public func bool(_ key: String) throws -> Bool? {
        guard let value = value(key) else { return nil }
        guard let bool = value.bool else { throw mismatch(key, expected: "a boolean", found: value) }
        return bool
    }

    public func integer(_ key: String) throws -> Int? {
        guard let value = value(key) else { return nil }
        guard let integer = value.int else { throw mismatch(key, expected: "an integer", found: value) }
        return integer
    }

    /// An integer within `range`.
    public func integer(_ key: String, in range: ClosedRange<Int>) throws -> Int? {
        guard let integer = try integer(key) else { return nil }
        guard range.contains(integer) else {
            throw error(key, "\(integer) is out of range (\(range.lowerBound)…\(range.upperBound))")
        }
        return integer
    }

    /// The largest size or offset a config may state: 1 EiB (2^60 bytes), more than any card.
    /// Bounded so that a start plus a size, or a size as an `Int`, cannot overflow.
    public static let largestByteSize: UInt64 = 1 << 60

    /// A size in bytes: a non-negative integer or a string such as "512MiB", "2GiB", "1G" (see
    /// `ByteCount.parse`), at most `largestByteSize`.
    public func byteSize(_ key: String) throws -> UInt64? {
        guard let value = value(key) else { return nil }
        let bytes: UInt64
        if let integer = value.int {
            guard integer >= 0 else { throw error(key, "a size cannot be negative (\(integer))") }
            bytes = UInt64(integer)
        } else {
            guard let text = value.string else {
                throw mismatch(key, expected: "a size (an integer or a string like \"512MiB\")", found: value)
            }
            do {
                bytes = try ByteCount.parse(text)
            } catch {
                throw self.error(key, error.description)
            }
        }
        guard bytes <= Self.largestByteSize else {
            throw error(key, "\(bytes) bytes is larger than any card (at most \(Self.largestByteSize), 1 EiB)")
        }
        return bytes
    }

    public func strings(_ key: String) throws -> [String]? {
        guard let value = value(key) else { return nil }
        guard let array = value.array else { throw mismatch(key, expected: "an array of strings", found: value) }
        return try array.enumerated().map { index, element in
            guard let string = element.string else {
                throw document.error(at: path(key) + [.index(index)],
                                     "expected a string, found \(Self.describe(element))")
            }
            return string
        }
    }

    /// A sub-table (`[a.b]` or an inline table).
    public func table(_ key: String) throws -> TOMLTableReader? {
        guard let value = value(key) else { return nil }
        guard let table = value.table else { throw mismatch(key, expected: "a table", found: value) }
        return TOMLTableReader(table: table, path: path(key), document: document)
    }

    /// An array of tables (`[[key]]`, or an array of inline tables).
    public func tables(_ key: String) throws -> [TOMLTableReader]? {
        guard let value = value(key) else { return nil }
        guard let array = value.array else {
            throw mismatch(key, expected: "an array of tables ([[\(key)]])", found: value)
        }
        return try array.enumerated().map { index, element in
            let elementPath = path(key) + [.index(index)]
            guard let table = element.table else {
                throw document.error(at: elementPath, "expected a table, found \(Self.describe(element))")
            }
            return TOMLTableReader(table: table, path: elementPath, document: document)
        }
    }

    /// Fails on the first key (in document order) that is not in `allowed`, suggesting the
    /// closest allowed key: a typo such as `verfy = true` must not silently mean "default".
    public func rejectUnknownKeys(_ allowed: [String]) throws {
        let unknown = table.keys.filter { !allowed.contains($0) }
        guard !unknown.isEmpty else { return }
        let first = unknown.min { (document.locator.line(of: path($0)) ?? .max) < (document.locator.line(of: path($1)) ?? .max) }!
        var message = "unknown key \"\(first)\""
        if let suggestion = Self.closest(to: first, in: allowed) {
            message += " (did you mean \"\(suggestion)\"?)"
        }
        message += "; allowed here: " + allowed.joined(separator: ", ")
        throw error(first, message)
    }

    func mismatch(_ key: String, expected: String, found value: TOMLValueConvertible) -> ConfigError {
        error(key, "expected \(expected), found \(Self.describe(value))")
    }

    /// "string \"yes\"", "integer 3", "table", … as an error message shows a value.
    public static func describe(_ value: TOMLValueConvertible) -> String {
        switch value.type {
        case .table: return "a table"
        case .array: return "an array"
        case .string: return "string \"\(value.string ?? "")\""
        default: return "\(value.type) \(value.tomlValue.debugDescription)"
        }
    }

    /// The allowed key within edit distance 2 of `key`, if any.
    static func closest(to key: String, in allowed: [String]) -> String? {
        let scored = allowed.map { ($0, editDistance(Array(key.lowercased()), Array($0))) }
        guard let best = scored.min(by: { $0.1 < $1.1 }), best.1 <= 2 else { return nil }
        return best.0
    }

    static func editDistance(_ a: [Character], _ b: [Character]) -> Int {
        var previous = Array(0...b.count)
        for (i, ca) in a.enumerated() {
            var current = [i + 1] + Array(repeating: 0, count: b.count)
            for (j, cb) in b.enumerated() {
                current[j + 1] = Swift.min(previous[j + 1] + 1, current[j] + 1, previous[j] + (ca == cb ? 0 : 1))
            }
            previous = current
        }
        return previous[b.count]
    }
}
