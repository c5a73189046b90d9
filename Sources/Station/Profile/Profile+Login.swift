#if canImport(Glibc)
import Glibc
#endif
import Accounts
import Foundation
import ImageIO

/// `provision config check`'s look inside a profile's image (issue 15): which hashes the
/// image's own login can verify, and the users who could never log in. The same rule runs
/// again at injection (`Injector` refuses such a user before writing it); this says so
/// before any card is written.
public struct LoginCheck: Sendable {
    public var profile: String
    /// nil when the image could not be read (missing, no root filesystem, …): see `note`.
    public var capabilities: LoginCapabilities?
    public var note: String?
    /// One per user whose hash (given, or the inventory's method for generated passwords)
    /// the image cannot verify.
    public var problems: [ConfigError] = []
}

extension Profile {
    /// Reads the image's root filesystem (a compressed image is first decompressed into a
    /// sparse temporary file) and checks every hash this profile and `inventory` would
    /// give a unit. Only sd profiles with users; nil otherwise.
    public func checkLogin(inventory: Inventory?, inventoryPath: String? = nil) -> LoginCheck? {
        let inventoryUsers = inventory?.users ?? []
        guard kind == .sd, inject, let image, !(users.isEmpty && inventoryUsers.isEmpty) else { return nil }
        var check = LoginCheck(profile: name)
        let root: RootLocator = switch self.root?.selector {
        case .partition(let n): .partition(n)
        case .label(let l): .label(l)
        case nil: .onlyExtPartition
        }
        let capabilities: LoginCapabilities
        do {
            capabilities = try Self.withRawImage(image.file) { try LoginCapabilities.inspect(target: $0, root: root) }
        } catch {
            check.note = "login not checked: \(error)"
            return check
        }
        check.capabilities = capabilities
        for user in users {
            guard case .hash(let hash) = user.password else { continue }
            if case .notVerifiable(let reason) = capabilities.verdict(forHash: hash) {
                check.problems.append(user.location.error("user \(user.name): \(reason)"))
            }
        }
        let generates = users.contains { $0.password == .generate } || (inventory?.generatesPasswords ?? false)
        let method = LoginCapabilities.method(of: inventory?.hashMethod ?? .sha512(rounds: nil))
        if generates, case .notVerifiable(let reason) = capabilities.verdict(for: method) {
            // The inventory chose the method ("hash = ..."): point at a user who gets one.
            let message = "generated passwords are hashed with \(method.name) (the inventory's hash): \(reason)"
            check.problems.append(users.first { $0.password == .generate }.map { $0.location.error("user \($0.name): " + message) }
                                  ?? ConfigError(file: inventoryPath ?? image.location.file, line: nil, keyPath: "hash", message: message))
        }
        for user in inventoryUsers {
            guard case .hash(let hash) = user.password else { continue }
            if case .notVerifiable(let reason) = capabilities.verdict(forHash: hash) {
                check.problems.append(ConfigError(file: inventoryPath ?? image.location.file, line: nil, keyPath: "users.\(user.name)",
                                                  message: "user \(user.name): \(reason)"))
            }
        }
        return check
    }

    /// Runs `body` on the image as a raw disk: the file itself, or its decompressed bytes in
    /// a temporary file (zero chunks left as holes) that is removed afterwards.
    static func withRawImage<T>(_ path: String, _ body: (String) throws -> T) throws -> T {
        let source = try ImageSource(path: path)
        if source.format == .raw { return try body(path) }
        let directory = FileManager.default.temporaryDirectory.path
        var template = Array("\(directory)/provision-login-check-XXXXXX".utf8CString)
        let fd = template.withUnsafeMutableBufferPointer { mkstemp($0.baseAddress!) }
        guard fd >= 0 else { throw ConfigError(file: path, line: nil, keyPath: "", message: "cannot create a temporary file in \(directory)") }
        let temporary = String(cString: template)
        defer { close(fd); unlink(temporary) }
        let chunk = 1 << 20
        let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
        defer { buffer.deallocate() }
        var offset: off_t = 0
        while true {
            let count = try source.read(into: buffer, count: chunk)
            guard count > 0 else { break }
            let bytes = UnsafeRawBufferPointer(start: buffer, count: count)
            if bytes.contains(where: { $0 != 0 }) {
                guard pwrite(fd, buffer, count, offset) == count else {
                    throw ConfigError(file: path, line: nil, keyPath: "", message: "cannot write the decompressed image to \(temporary): \(String(cString: strerror(errno)))")
                }
            }
            offset += off_t(count)
        }
        guard ftruncate(fd, offset) == 0 else {
            throw ConfigError(file: path, line: nil, keyPath: "", message: "cannot size \(temporary): \(String(cString: strerror(errno)))")
        }
        return try body(temporary)
    }
}

extension StationConfig {
    /// `checkLogin` for every profile that gives units users, in name order.
    public func loginChecks() -> [LoginCheck] {
        let inventory = inventoryPath.flatMap { try? Inventory.load(path: $0) }
        return profiles.keys.sorted().compactMap { profiles[$0]?.checkLogin(inventory: inventory, inventoryPath: inventoryPath) }
    }

    /// Where generated passwords go, for `provision config check`: the inventory's export
    /// file, else the station's; nil when none is set.
    public var passwordExportDestination: String? { effectivePasswordExport().path }
}
