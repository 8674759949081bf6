"""Routes `urllib.request.urlopen` inside the sandbox through `capsule.http`, so common
pure-Python code that uses urllib works unchanged (and under the same `allowed_hosts`)."""

import email.message
import io
import urllib.error
import urllib.request
import urllib.response

from capsule import http


class CapsuleHTTPHandler(urllib.request.BaseHandler):
    # Before urllib's own socket-based handlers.
    handler_order = 100

    def http_open(self, req):
        timeout = req.timeout if isinstance(req.timeout, (int, float)) else None
        try:
            response = http.request(
                req.get_method(), req.full_url, headers=dict(req.header_items()), data=req.data, timeout=timeout
            )
        except http.HttpError as error:
            raise urllib.error.URLError(str(error)) from error
        headers = email.message.Message()
        for name, value in response.headers.items():
            headers[name] = value
        result = urllib.response.addinfourl(io.BytesIO(response.content), headers, response.url, response.status_code)
        result.msg = ""
        return result

    https_open = http_open


def install():
    urllib.request.install_opener(urllib.request.build_opener(CapsuleHTTPHandler))
