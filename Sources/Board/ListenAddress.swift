#if canImport(Glibc)
import Glibc
#endif

/// Where the board serves: a numeric IP address and a port. Host names are refused on
/// purpose: a name can resolve to several addresses (or to another one tomorrow), and the
/// board must listen exactly where it was told and nowhere else.
public struct ListenAddress: Sendable, Equatable, CustomStringConvertible {
    public let host: String
    public let port: Int

    public static let usage = "ADDRESS:PORT with a numeric IP address, e.g. 127.0.0.1:8080, 0.0.0.0:8080 or [::1]:8080 (port 0: any free port)"

    init(host: String, port: Int) { self.host = host; self.port = port }

    public init(parsing text: String) throws(BoardError) {
        let host: String
        let portText: Substring
        if text.hasPrefix("[") {
            guard let close = text.firstIndex(of: "]"), text[text.index(after: close)...].hasPrefix(":") else {
                throw BoardError("--listen \(text): an IPv6 address needs a port after the bracket; want \(Self.usage)")
            }
            host = String(text[text.index(after: text.startIndex)..<close])
            portText = text[text.index(close, offsetBy: 2)...]
        } else {
            guard let colon = text.lastIndex(of: ":") else {
                throw BoardError("--listen \(text): no port; want \(Self.usage)")
            }
            host = String(text[..<colon])
            portText = text[text.index(after: colon)...]
            if host.contains(":") {
                throw BoardError("--listen \(text): put an IPv6 address in brackets; want \(Self.usage)")
            }
        }
        guard let port = Int(portText), (0...65535).contains(port) else {
            throw BoardError("--listen \(text): \"\(portText)\" is not a port number (0–65535); want \(Self.usage)")
        }
        guard Self.isNumeric(host) else {
            throw BoardError("--listen \(text): \"\(host)\" is not a numeric IP address; want \(Self.usage)")
        }
        self.host = host
        self.port = port
    }

    public var description: String { host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)" }

    static func isNumeric(_ host: String) -> Bool {
        var v4 = in_addr()
        var v6 = in6_addr()
        return inet_pton(AF_INET, host, &v4) == 1 || inet_pton(AF_INET6, host, &v6) == 1
    }
}

public struct BoardError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public init(_ description: String) { self.description = description }
}
