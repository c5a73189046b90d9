// A real browser for tests: Debian's headless Chromium, driven through Debian's
// chromedriver with the W3C WebDriver protocol (JSON over HTTP, the same protocol Selenium
// speaks to chromedriver). The HTTP client is curl, so no part of the chain is ours.

import Foundation

public struct WebDriverError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

public final class BrowserSession: Sendable {
    public static let chromium = "/usr/bin/chromium"
    public static let chromedriver = "/usr/bin/chromedriver"
    /// Why a test that needs the browser cannot run, or nil when it can.
    public static var unavailable: String? {
        for binary in [chromium, chromedriver] where !FileManager.default.isExecutableFile(atPath: binary) {
            return "\(binary) is missing: apt-get install chromium chromium-driver (make test does)"
        }
        return nil
    }

    private let driver: ChildProcess
    private let endpoint: String
    private let session: String
    private let profile: TemporaryDirectory

    /// Starts chromedriver and one headless Chromium window of `width`×`height` CSS pixels.
    public init(width: Int = 1920, height: Int = 1080, logPath: String) throws {
        if let reason = Self.unavailable { throw WebDriverError(description: reason) }
        let port = try ChildProcess.freePort()
        endpoint = "http://127.0.0.1:\(port)"
        driver = try ChildProcess([Self.chromedriver, "--port=\(port)", "--allowed-ips=127.0.0.1"], logPath: logPath)
        profile = try TemporaryDirectory("provision-chromium")
        do {
            try driver.waitForLine(containing: "was started successfully", timeout: .seconds(30))
            let capabilities: [String: Any] = ["capabilities": ["alwaysMatch": [
                "browserName": "chrome",
                "goog:chromeOptions": [
                    "binary": Self.chromium,
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                             "--hide-scrollbars", "--force-device-scale-factor=1", "--no-first-run",
                             "--window-size=\(width),\(height)", "--user-data-dir=\(profile.path)"],
                ] as [String: Any],
            ] as [String: Any]]]
            let reply = try Self.request("POST", endpoint + "/session", body: capabilities, timeout: 60)
            guard let value = reply["value"] as? [String: Any], let id = value["sessionId"] as? String else {
                throw WebDriverError(description: "chromedriver did not start a session: \(reply); log:\n\(driver.log)")
            }
            session = id
        } catch {
            driver.stop()
            profile.remove()
            throw error
        }
    }

    deinit { quit() }

    /// Closes the browser and stops chromedriver. Idempotent.
    public func quit() {
        if driver.isRunning { _ = try? Self.request("DELETE", "\(endpoint)/session/\(session)", body: nil, timeout: 20) }
        driver.stop()
        profile.remove()
    }

    public func open(_ url: String) throws {
        _ = try command("POST", "url", ["url": url])
    }

    /// Runs `script` (a function body: `return …`) in the page and returns its result as JSON.
    public func evaluate(_ script: String) throws -> Any? {
        try command("POST", "execute/sync", ["script": script, "args": [Any]()])
    }

    /// Evaluates `script` every 100 ms until it returns true; throws with the last value of
    /// `describe` (a script whose result explains the page) after `timeout`.
    public func waitUntil(_ what: String, timeout: Duration = .seconds(300), _ script: String,
                          describe: String = "return document.body.innerText") throws {
        let deadline = ContinuousClock.now.advanced(by: timeout)
        while ContinuousClock.now < deadline {
            if try evaluate(script) as? Bool == true { return }
            usleep(100_000)
        }
        let page = (try? evaluate(describe)).map { "\($0 ?? "null")" } ?? "(page unreadable)"
        throw WebDriverError(description: "timed out after \(timeout) waiting for \(what); the page shows:\n\(page)")
    }

    /// Resizes the window (the viewport, in headless mode) to `width`×`height` CSS pixels.
    public func resize(width: Int, height: Int) throws {
        _ = try command("POST", "window/rect", ["width": width, "height": height])
    }

    /// Resizes the window so that the page's viewport is `width`×`height` CSS pixels (the
    /// window's own frame, even headless, takes some of the window size).
    public func setViewport(width: Int, height: Int) throws {
        try resize(width: width, height: height)
        guard let inner = try evaluate("return [window.innerWidth, window.innerHeight]") as? [Int], inner.count == 2 else {
            throw WebDriverError(description: "the page did not report its viewport")
        }
        try resize(width: 2 * width - inner[0], height: 2 * height - inner[1])
    }

    /// A PNG of the viewport.
    public func screenshot() throws -> Data {
        guard let text = try command("GET", "screenshot", nil) as? String, let png = Data(base64Encoded: text) else {
            throw WebDriverError(description: "chromedriver sent no screenshot")
        }
        return png
    }

    private func command(_ method: String, _ path: String, _ body: [String: Any]?) throws -> Any? {
        let reply = try Self.request(method, "\(endpoint)/session/\(session)/\(path)", body: body, timeout: 60)
        if let value = reply["value"] as? [String: Any], let error = value["error"] as? String {
            throw WebDriverError(description: "WebDriver \(path): \(error): \(value["message"] ?? "")")
        }
        return reply["value"]
    }

    private static func request(_ method: String, _ url: String, body: [String: Any]?, timeout: Int) throws -> [String: Any] {
        var arguments = ["curl", "-sS", "--max-time", "\(timeout)", "-X", method, "-H", "Content-Type: application/json"]
        var input: Data?
        if let body {
            input = try JSONSerialization.data(withJSONObject: body)
            arguments += ["--data-binary", "@-"]
        }
        arguments.append(url)
        let output = try Command.run(arguments, input: input.map { String(decoding: $0, as: UTF8.self) }, timeout: .seconds(timeout + 10))
        guard output.succeeded else { throw WebDriverError(description: "\(output)") }
        guard let object = try? JSONSerialization.jsonObject(with: Data(output.stdout.utf8)) as? [String: Any] else {
            throw WebDriverError(description: "chromedriver answered \(method) \(url) with: \(output.stdout.prefix(500))")
        }
        return object
    }
}
