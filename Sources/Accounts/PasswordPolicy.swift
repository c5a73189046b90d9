/// How generated passwords look.
public struct PasswordPolicy: Sendable, Equatable, Codable {
    /// Letters and digits without look-alikes (0/O, 1/l/I), so a password read off a
    /// screen or paper is typed right the first time.
    public static let unambiguousAlphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"

    public var length: Int
    public var alphabet: String

    public init(length: Int = 20, alphabet: String = PasswordPolicy.unambiguousAlphabet) {
        self.length = length
        self.alphabet = alphabet
    }

    func validate() throws(AccountsError) {
        let distinct = Set(alphabet)
        guard (8...256).contains(length) else {
            throw AccountsError(.invalidSpec, "generated password length must be 8–256, not \(length)")
        }
        guard distinct.count >= 10, distinct.count == alphabet.count else {
            throw AccountsError(.invalidSpec,
                "password alphabet needs at least 10 distinct characters and no repeats (has \(alphabet.count), \(distinct.count) distinct)")
        }
        guard alphabet.allSatisfy({ $0.isASCII && !$0.isWhitespace && $0 != ":" && !$0.isNewline && $0.asciiValue! >= 0x21 }) else {
            throw AccountsError(.invalidSpec, "password alphabet must be printable ASCII without spaces or ':'")
        }
    }

    /// A fresh password. `SystemRandomNumberGenerator` reads getrandom(2) on Linux, and
    /// `randomElement(using:)` draws without modulo bias.
    public func generate() throws(AccountsError) -> String {
        try validate()
        var rng = SystemRandomNumberGenerator()
        let characters = Array(alphabet)
        return String((0..<length).map { _ in characters.randomElement(using: &rng)! })
    }
}
