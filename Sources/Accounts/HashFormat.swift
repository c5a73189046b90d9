/// Structural check of a pre-made shadow password field, so a typo (a truncated paste,
/// a plaintext password, an MD5 `$1$`) is refused before it locks someone out or lets
/// anyone in. Accepted: `$6$`, `$5$` (SHA-crypt), `$y$` (yescrypt), `$2b$` (bcrypt),
/// and locked accounts: `!`, `*`, `!*`, `!!`, or `!` before an accepted hash.
public enum HashFormat {
    static let cryptAlphabet = Set("./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")

    public static func validate(_ field: String) throws(AccountsError) {
        if ["!", "*", "!*", "!!"].contains(field) { return }
        let hash = field.hasPrefix("!") ? String(field.dropFirst()) : field
        guard isValidHash(hash) else {
            // Name only the method id: a plaintext password pasted here must not reach a log.
            let id = hash.split(separator: "$", omittingEmptySubsequences: false).dropFirst().first ?? ""
            let method = hash.hasPrefix("$") && id.count <= 3 && id.allSatisfy(\.isLetterOrDigitASCII)
                ? "method $\(id)$" : "no known method id"
            throw AccountsError(.invalidHash, """
                the password hash given (\(field.count) characters, \(method)) is not an accepted \
                crypt hash: use $6$ (mkpasswd -m sha-512), $y$ (mkpasswd -m yescrypt), $5$ or $2b$, \
                or "!" to lock the account
                """)
        }
    }

    static func isValidHash(_ hash: String) -> Bool {
        let parts = hash.split(separator: "$", omittingEmptySubsequences: false).map(String.init)
        // "$6$salt$hash" splits to ["", "6", "salt", "hash"].
        guard parts.count >= 4, parts[0].isEmpty else { return false }
        func crypt64(_ s: String, _ lengths: ClosedRange<Int>) -> Bool {
            lengths.contains(s.count) && s.allSatisfy(cryptAlphabet.contains)
        }
        switch parts[1] {
        case "6", "5":
            var rest = parts[2...]
            if rest.first?.hasPrefix("rounds=") == true {
                guard let n = Int(rest.first!.dropFirst(7)), (1000...999_999_999).contains(n) else { return false }
                rest = rest.dropFirst()
            }
            guard rest.count == 2 else { return false }
            return crypt64(rest.first!, 1...16) && crypt64(rest.last!, parts[1] == "6" ? 86...86 : 43...43)
        case "y":
            return parts.count == 5 && crypt64(parts[2], 1...32) && crypt64(parts[3], 1...64)
                && crypt64(parts[4], 43...43)
        case "2b", "2y", "2a":
            guard parts.count == 4, let cost = Int(parts[2]), parts[2].count == 2, (4...31).contains(cost)
            else { return false }
            return crypt64(parts[3], 53...53)
        default:
            return false
        }
    }
}

extension Character {
    var isLetterOrDigitASCII: Bool { isASCII && (isLetter || isNumber) }
}
