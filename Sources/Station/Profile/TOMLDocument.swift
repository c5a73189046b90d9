import Accounts
import TOMLKit

/// A parsed TOML file together with what is needed to report errors in it precisely: the
/// name to show, a key locator over its text, and the directory relative paths start from.
public struct TOMLDocument: Sendable {
    /// The file name as errors show it (`station.toml`, `images/rpi/profile.toml`).
    public var source: String
    public var locator: TOMLKeyLocator
    /// Relative paths inside the document are resolved against this directory.
    public var baseDirectory: String

    public init(source: String, locator: TOMLKeyLocator, baseDirectory: String) {
        self.source = source
        self.locator = locator
        self.baseDirectory = baseDirectory
    }

    /// Parses `text`; a syntax error becomes a `ConfigError` with TOMLKit's line and column.
    public static func parse(text: String, source: String, baseDirectory: String) throws -> (TOMLTable, TOMLDocument) {
        // toml++ reads a C string: at a NUL byte the document would silently end, and every
        // key after it (a whole list of slots) would be missing without an error.
        if let nul = TOMLNUL.first(in: text) {
            throw ConfigError(file: source, line: nul.line, column: nul.column, keyPath: "", message: nul.message)
        }
        let table: TOMLTable
        do {
            table = try TOMLTable(string: text)
        } catch let error as TOMLParseError {
            throw ConfigError(file: source, line: error.source.begin.line, column: error.source.begin.column,
                              keyPath: "", message: "TOML syntax error: \(error.description)")
        }
        return (table, TOMLDocument(source: source, locator: TOMLKeyLocator(source: text), baseDirectory: baseDirectory))
    }

    /// An error about `path`, on the line of that key or of its nearest enclosing table.
    public func error(at path: [TOMLKeyLocator.Segment], _ message: String) -> ConfigError {
        ConfigError(file: source, line: locator.nearestLine(of: path),
                    keyPath: TOMLKeyLocator.format(path), message: message)
    }

    /// `path` made absolute against `baseDirectory` (absolute paths are kept as they are).
    public func resolve(path: String) -> String {
        // An image (or its bmap) on a build server stays a URL (issue 17).
        if path.hasPrefix("/") || path.hasPrefix("http://") || path.hasPrefix("https://") { return path }
        if baseDirectory.isEmpty || baseDirectory == "." { return path }
        return baseDirectory.hasSuffix("/") ? baseDirectory + path : baseDirectory + "/" + path
    }
}
