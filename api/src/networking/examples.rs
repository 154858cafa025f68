//! Istio's documentation examples (bookinfo request routing, fault injection, timeouts, retries,
//! circuit breaking, egress ServiceEntries and the API reference's samples), as YAML with
//! `apiVersion: networking.istio.io/v1`. Unit tests round-trip them through the types; the
//! e2e tests apply them to a real cluster under every served version.

/// `(name, YAML)` of every example, DestinationRules first so their subsets exist when the
/// VirtualServices that use them are admitted.
pub const EXAMPLES: &[(&str, &str)] = &[
    ("reviews-destination-rule", REVIEWS_DESTINATION_RULE),
    ("ratings-destination-rule", RATINGS_DESTINATION_RULE),
    ("circuit-breaker", CIRCUIT_BREAKER),
    ("destination-rule-reference", DESTINATION_RULE_REFERENCE),
    ("reviews-jason-v2", REVIEWS_JASON_V2),
    ("ratings-fault-delay", RATINGS_FAULT_DELAY),
    ("ratings-fault-abort", RATINGS_FAULT_ABORT),
    ("reviews-timeout", REVIEWS_TIMEOUT),
    ("httpbin-timeout", HTTPBIN_TIMEOUT),
    ("ratings-retries", RATINGS_RETRIES),
    ("virtual-service-reference", VIRTUAL_SERVICE_REFERENCE),
    ("tcp-and-tls-routes", TCP_AND_TLS_ROUTES),
    ("httpbin-external", HTTPBIN_EXTERNAL),
    ("mongo-static", MONGO_STATIC),
    ("details-workload-selector", DETAILS_WORKLOAD_SELECTOR),
];

pub const REVIEWS_DESTINATION_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      simple: RANDOM
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
    trafficPolicy:
      loadBalancer:
        simple: ROUND_ROBIN
  - name: v3
    labels:
      version: v3
"#;

pub const RATINGS_DESTINATION_RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: ratings
spec:
  host: ratings
  subsets:
  - name: v1
    labels:
      version: v1
  - name: v2
    labels:
      version: v2
"#;

pub const CIRCUIT_BREAKER: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: httpbin
spec:
  host: httpbin
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 1
      http:
        http1MaxPendingRequests: 1
        maxRequestsPerConnection: 1
    outlierDetection:
      consecutive5xxErrors: 1
      interval: 1s
      baseEjectionTime: 3m
      maxEjectionPercent: 100
"#;

pub const DESTINATION_RULE_REFERENCE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: bookinfo-ratings-port
spec:
  host: ratings.prod.svc.cluster.local
  trafficPolicy:
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
        tcpKeepalive:
          time: 7200s
          interval: 75s
      http:
        http2MaxRequests: 1000
        maxRequestsPerConnection: 10
        idleTimeout: 1h
        h2UpgradePolicy: UPGRADE
        useClientProtocol: true
    loadBalancer:
      consistentHash:
        httpCookie:
          name: user
          ttl: 0s
      localityLbSetting:
        enabled: true
        distribute:
        - from: us-west/zone1/*
          to:
            "us-west/zone1/*": 80
            "us-west/zone2/*": 20
      warmupDurationSecs: 100s
    outlierDetection:
      consecutiveGatewayErrors: 7
      consecutive5xxErrors: 5
      interval: 5m
      baseEjectionTime: 15m
      minHealthPercent: 50
      splitExternalLocalOriginErrors: true
    tls:
      mode: MUTUAL
      clientCertificate: /etc/certs/myclientcert.pem
      privateKey: /etc/certs/client_private_key.pem
      caCertificates: /etc/certs/rootcacerts.pem
      subjectAltNames:
      - ratings.prod.svc.cluster.local
      sni: ratings.prod.svc.cluster.local
      insecureSkipVerify: false
    portLevelSettings:
    - port:
        number: 80
      loadBalancer:
        simple: LEAST_REQUEST
    - port:
        number: 9080
      loadBalancer:
        consistentHash:
          httpHeaderName: x-user
      tls:
        mode: SIMPLE
        credentialName: ratings-client
  subsets:
  - name: testversion
    labels:
      version: v3
    trafficPolicy:
      loadBalancer:
        consistentHash:
          useSourceIp: true
  exportTo:
  - "."
  workloadSelector:
    matchLabels:
      app: ratings
"#;

pub const REVIEWS_JASON_V2: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    route:
    - destination:
        host: reviews
        subset: v2
  - route:
    - destination:
        host: reviews
        subset: v1
"#;

pub const RATINGS_FAULT_DELAY: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      delay:
        percentage:
          value: 100.0
        fixedDelay: 7s
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#;

pub const RATINGS_FAULT_ABORT: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-abort
spec:
  hosts:
  - ratings
  http:
  - match:
    - headers:
        end-user:
          exact: jason
    fault:
      abort:
        percentage:
          value: 100.0
        httpStatus: 500
    route:
    - destination:
        host: ratings
        subset: v1
  - route:
    - destination:
        host: ratings
        subset: v1
"#;

pub const REVIEWS_TIMEOUT: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-timeout
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v2
    timeout: 0.5s
"#;

pub const HTTPBIN_TIMEOUT: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: httpbin
spec:
  hosts:
  - httpbin
  http:
  - timeout: 3s
    route:
    - destination:
        host: httpbin
      weight: 100
"#;

pub const RATINGS_RETRIES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: ratings-retries
spec:
  hosts:
  - ratings
  http:
  - route:
    - destination:
        host: ratings
        subset: v1
    retries:
      attempts: 3
      perTryTimeout: 2s
      retryOn: gateway-error,connect-failure,refused-stream,503
      retryRemoteLocalities: true
"#;

pub const VIRTUAL_SERVICE_REFERENCE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews-route
spec:
  hosts:
  - reviews.prod.svc.cluster.local
  gateways:
  - mesh
  http:
  - name: reviews-v2-routes
    match:
    - uri:
        prefix: /wpcatalog
    - uri:
        prefix: /consumercatalog
      ignoreUriCase: true
      method:
        exact: GET
      queryParams:
        user:
          regex: "^[a-z]+$"
      withoutHeaders:
        x-debug: {}
      sourceLabels:
        app: productpage
      sourceNamespace: bookinfo
      port: 9080
    rewrite:
      uri: /newcatalog
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v2
      weight: 25
      headers:
        response:
          remove:
          - foo
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v1
      weight: 75
    headers:
      request:
        set:
          test: "true"
        add:
          x-trace: "on"
    corsPolicy:
      allowOrigins:
      - exact: https://example.com
      - regex: "https://.*\\.example\\.org"
      allowMethods:
      - POST
      - GET
      allowCredentials: false
      allowHeaders:
      - X-Foo-Bar
      exposeHeaders:
      - X-Expose
      maxAge: 24h
    mirror:
      host: reviews.prod.svc.cluster.local
      subset: v3
    mirrorPercentage:
      value: 50.5
  - match:
    - uri:
        exact: /v1/getProductRatings
    redirect:
      uri: /v1/bookRatings
      authority: newratings.default.svc.cluster.local
      redirectCode: 301
  - match:
    - uri:
        regex: "^/legacy/(.*)$"
    rewrite:
      uriRegexRewrite:
        match: "^/legacy/(.*)$"
        rewrite: /\1
    route:
    - destination:
        host: reviews.prod.svc.cluster.local
        port:
          number: 9080
    mirrors:
    - destination:
        host: reviews.prod.svc.cluster.local
        subset: v3
      percentage:
        value: 10.0
  - match:
    - authority:
        prefix: api.
    directResponse:
      status: 503
      body:
        string: "unavailable"
  - match:
    - headers:
        x-delegate:
          exact: "yes"
    delegate:
      name: reviews-delegate
      namespace: bookinfo
  exportTo:
  - "."
  - istio-system
"#;

pub const TCP_AND_TLS_ROUTES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: bookinfo-sni
spec:
  hosts:
  - "*.bookinfo.com"
  - mongo.prod.svc.cluster.local
  gateways:
  - mygateway
  tls:
  - match:
    - port: 443
      sniHosts:
      - login.bookinfo.com
      destinationSubnets:
      - 10.0.0.0/8
    route:
    - destination:
        host: login.prod.svc.cluster.local
  tcp:
  - match:
    - port: 27017
      sourceSubnet: 192.168.0.0/16
    route:
    - destination:
        host: mongo.backup.svc.cluster.local
        port:
          number: 5555
      weight: 100
"#;

pub const HTTPBIN_EXTERNAL: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: httpbin-ext
spec:
  hosts:
  - httpbin.org
  ports:
  - number: 80
    name: http
    protocol: HTTP
  resolution: DNS
  location: MESH_EXTERNAL
"#;

pub const MONGO_STATIC: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: external-svc-mongocluster
spec:
  hosts:
  - mymongodb.somedomain
  addresses:
  - 192.192.192.192/24
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
    targetPort: 27019
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
  - address: 3.3.3.3
    ports:
      mongodb: 27020
    labels:
      zone: b
    network: network-b
    locality: us-west/zone2
    weight: 2
    serviceAccount: mongo
  subjectAltNames:
  - spiffe://cluster.local/ns/db/sa/mongo
  exportTo:
  - "*"
"#;

pub const DETAILS_WORKLOAD_SELECTOR: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata:
  name: details-svc
spec:
  hosts:
  - details.bookinfo.com
  location: MESH_INTERNAL
  ports:
  - number: 80
    name: http
    protocol: HTTP
    targetPort: 8080
  resolution: STATIC
  workloadSelector:
    labels:
      app: details-legacy
"#;
