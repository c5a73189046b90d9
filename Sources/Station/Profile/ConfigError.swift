/// A mistake in a configuration file (station config or board profile), located precisely
/// enough for a person to open the file and fix it.
///
/// The description reads like a compiler diagnostic, so editors and terminals can jump to it:
/// `station.toml:14: profiles.demo.verify: expected a boolean, found string "yes"`.
public struct ConfigError: Error, CustomStringConvertible, Sendable, Equatable {
    /// The file as the user named it (not necessarily absolute).
    public var file: String
    /// 1-based line, when the key (or its nearest enclosing table) could be located.
    public var line: Int?
    /// 1-based column; only TOML syntax errors know it.
    public var column: Int?
    /// The key path in the document, e.g. `profiles.demo.image` or `slots[2].match`; empty for
    /// errors about the whole document.
    public var keyPath: String
    /// What is wrong and, where possible, what to do about it.
    public var message: String

    public init(file: String, line: Int?, column: Int? = nil, keyPath: String, message: String) {
        self.file = file
        self.line = line
        self.column = column
        self.keyPath = keyPath
        self.message = message
    }

    public var description: String {
        var text = file
        if let line {
            text += ":\(line)"
            if let column { text += ":\(column)" }
        }
        text += ": "
        if !keyPath.isEmpty { text += keyPath + ": " }
        return text + message
    }
}
