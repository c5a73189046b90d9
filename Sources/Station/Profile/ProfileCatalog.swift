import Foundation

/// Every profile under a directory such as `images/`: each `NAME/profile.toml`.
///
/// A broken profile does not hide the others: the daemon keeps serving the good ones and
/// reports the problems, so `problems` holds one error per file that failed.
public struct ProfileCatalog: Sendable {
    public var directory: String
    /// Loaded profiles by name.
    public var profiles: [String: Profile]
    public var problems: [ConfigError]

    public var names: [String] { profiles.keys.sorted() }

    public subscript(name: String) -> Profile? { profiles[name] }

    /// Loads `directory/*/profile.toml` in name order. Throws only if the directory cannot be listed.
    public static func load(directory: String) throws -> ProfileCatalog {
        let entries: [String]
        do {
            entries = try FileManager.default.contentsOfDirectory(atPath: directory).sorted()
        } catch {
            throw ConfigError(file: directory, line: nil, keyPath: "",
                              message: "cannot list the profile directory: \((error as NSError).localizedDescription)")
        }
        var catalog = ProfileCatalog(directory: directory, profiles: [:], problems: [])
        for entry in entries where !entry.hasPrefix(".") {
            let file = (directory as NSString).appendingPathComponent(entry + "/profile.toml")
            guard FileManager.default.fileExists(atPath: file) else { continue }
            do {
                let profile = try Profile.load(file: file)
                catalog.profiles[profile.name] = profile
            } catch let error as ConfigError {
                catalog.problems.append(error)
            }
        }
        return catalog
    }

    /// Throws the first problem, for callers (tests, `provision config check`) that want all-or-nothing.
    public func requireNoProblems() throws {
        if let first = problems.first { throw first }
    }
}
